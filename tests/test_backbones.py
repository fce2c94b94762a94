"""Backbones (causality, padding, bidirectionality, shapes), losses by hand-computed values, negatives."""

from __future__ import annotations

import math

import pytest
import torch

from xdtrain.nn import BERT4Rec, GRU4Rec, SASRec, last_state
from xdtrain.nn.layers import keep_last
from xdtrain.nn.losses import bce_loss, bpr_loss, full_softmax_loss, sampled_softmax_loss
from xdtrain.nn.negatives import uniform_negatives

D = 16


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {
        "sasrec": lambda: SASRec(d=D, max_len=12, blocks=2, heads=2, dropout=0.2),
        "gru4rec": lambda: GRU4Rec(d=D, layers=2, dropout=0.2),
        "bert4rec": lambda: BERT4Rec(d=D, max_len=12, layers=2, heads=2, dropout=0.1),
    }[name]()
    return model.eval()  # dropout off: the properties below are about the function, not the noise


def lengths_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


ALL = ["sasrec", "gru4rec", "bert4rec"]


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_padding_rows_are_zero(name):
    model = make(name)
    x = torch.randn(3, 7, D)
    mask = lengths_mask([7, 4, 1], 7)
    states = model(x, mask)
    assert states.shape == (3, 7, D)
    assert torch.all(states[~mask] == 0)
    assert model.user_state(x, mask).shape == (3, D)
    assert not any("item" in n or p.shape[0] > 100 for n, p in model.named_parameters()), "no item table"


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_causal_state_ignores_later_items(name):
    model = make(name)
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, D)  # change items 5, 6, 7
    a, b = model(x, mask), model(y, mask)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3  # and the later states do see the change


@pytest.mark.parametrize("name", ALL)
def test_extra_padding_does_not_change_results(name):
    model = make(name)
    x = torch.randn(2, 5, D)
    mask = lengths_mask([5, 3], 5)
    padded = torch.cat([x, torch.randn(2, 6, D)], dim=1)  # garbage embeddings in the padding slots
    pmask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    a, b = model(x, mask), model(padded, pmask)
    torch.testing.assert_close(a, b[:, :5], atol=1e-5, rtol=1e-5)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(model.user_state(x, mask), model.user_state(padded, pmask), **tol)
    # a row batched with a longer one equals the row alone, unpadded
    alone = model(x[1:, :3], mask[1:, :3])
    torch.testing.assert_close(a[1:, :3], alone, atol=1e-5, rtol=1e-5)


def test_bert4rec_sees_both_directions():
    model = make("bert4rec")
    x = torch.randn(1, 6, D)
    mask = torch.ones(1, 6, dtype=torch.bool)
    y = x.clone()
    y[:, 5] = torch.randn(D)
    a, b = model(x, mask), model(y, mask)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3


def test_bert4rec_mask_token_belongs_to_backbone():
    model = make("bert4rec")
    x = torch.randn(1, 6, D)
    mask = torch.ones(1, 6, dtype=torch.bool)
    masked = torch.zeros(1, 6, dtype=torch.bool)
    masked[0, 2] = True
    y = x.clone()
    y[0, 2] = torch.randn(D)  # the hidden item's own embedding must not leak through [MASK]
    torch.testing.assert_close(model(x, mask, masked), model(y, mask, masked))
    assert "mask_token" in dict(model.named_parameters())
    # user_state: a [MASK] appended after the last real item, equal to doing it by hand
    lengths = [4]
    m = lengths_mask(lengths, 6)
    by_hand_x = x.clone()
    by_hand_mask = lengths_mask([5], 6)
    slot = torch.zeros(1, 6, dtype=torch.bool)
    slot[0, 4] = True
    expected = model(by_hand_x, by_hand_mask, slot)[0, 4]
    torch.testing.assert_close(model.user_state(x, m)[0], expected)


def test_user_state_truncates_long_histories_to_the_most_recent_items():
    model = make("sasrec")  # max_len 12
    x = torch.randn(1, 15, D)
    mask = torch.ones(1, 15, dtype=torch.bool)
    torch.testing.assert_close(model.user_state(x, mask), model.user_state(x[:, 3:], mask[:, 3:]))
    bert = make("bert4rec")  # keeps 11 items + [MASK]
    torch.testing.assert_close(bert.user_state(x, mask), bert.user_state(x[:, 4:], mask[:, 4:]))


def test_last_state_and_keep_last_by_hand():
    states = torch.arange(2 * 3 * 1, dtype=torch.float).view(2, 3, 1)  # row0: 0,1,2  row1: 3,4,5
    mask = lengths_mask([2, 0], 3)
    assert last_state(states, mask).flatten().tolist() == [1.0, 0.0]
    x = torch.arange(1, 5, dtype=torch.float).view(1, 4, 1)  # items 1,2,3 real, slot 4 padding
    out, m = keep_last(x, lengths_mask([3], 4), 2)
    assert out.flatten().tolist() == [2.0, 3.0] and m.tolist() == [[True, True]]
    out, m = keep_last(x, lengths_mask([1], 4), 2)
    assert out.flatten().tolist() == [1.0, 0.0] and m.tolist() == [[True, False]]


def test_length_over_max_len_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        make("sasrec")(torch.randn(1, 13, D), torch.ones(1, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        make("gru4rec")(torch.randn(1, 3, D), torch.ones(1, 3))


# ---- losses, each against a value computed by hand ----

def test_bpr_by_hand():
    # rows: pos 1 vs negs (0, 2): -[log s(1) + log s(-1)] / 2 ; log s(1) = -0.3132617, log s(-1) = -1.3132617
    loss = bpr_loss(torch.tensor([1.0]), torch.tensor([[0.0, 2.0]]))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)


def test_bce_by_hand():
    # row 0: pos 0, negs (0, 0): log2 + 2 log2 ; row 1: pos 1, neg (-1, -1): 3 * 0.3132617 ; mean of rows
    loss = bce_loss(torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 0.0], [-1.0, -1.0]]))
    assert loss.item() == pytest.approx((3 * math.log(2) + 3 * 0.3132617) / 2, abs=1e-6)


def test_sampled_softmax_by_hand_and_accidental_hits():
    pos, neg = torch.tensor([2.0]), torch.tensor([[1.0, 0.0]])
    # -log e^2 / (e^2 + e^1 + e^0) = log(1 + e^-1 + e^-2)
    assert sampled_softmax_loss(pos, neg).item() == pytest.approx(math.log(1.503214724), abs=1e-6)
    # the first negative is the positive itself (id 5): it is dropped, leaving log(1 + e^-2)
    loss = sampled_softmax_loss(pos, neg, pos_ids=torch.tensor([5]), neg_ids=torch.tensor([[5, 7]]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # logQ: subtracting log q = (0, log 2, 0) from (pos, neg1, neg2) -> logits (2, 1 - log2, 0)
    log_q_neg = torch.tensor([[math.log(2), 0.0]])
    loss = sampled_softmax_loss(pos, neg, log_q_pos=torch.tensor([0.0]), log_q_neg=log_q_neg)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1) / 2 + math.exp(-2)), abs=1e-6)


def test_full_softmax_by_hand():
    logits, target = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2])
    assert full_softmax_loss(logits, target).item() == pytest.approx(math.log(1.503214724), abs=1e-6)
    ignore = torch.tensor([True, False, False])  # column 0 is padding, not an item
    expected = math.log(1 + math.exp(-1))
    assert full_softmax_loss(logits, target, ignore).item() == pytest.approx(expected, abs=1e-6)


def test_sampled_softmax_with_every_item_equals_full_softmax():
    torch.manual_seed(1)
    V, N = 9, 5
    table = torch.randn(V + 1, D)  # row 0 = padding
    users = torch.randn(N, D)
    targets = torch.randint(1, V + 1, (N,))
    full = full_softmax_loss(users @ table.T, targets, ignore=torch.arange(V + 1) == 0)
    all_items = torch.arange(1, V + 1)  # shared negatives: the whole catalogue, positives included
    pos = (users * table[targets]).sum(-1)
    sampled = sampled_softmax_loss(pos, users @ table[all_items].T, pos_ids=targets, neg_ids=all_items)
    torch.testing.assert_close(sampled, full)


def test_uniform_negatives_avoid_seen_items():
    g = torch.Generator().manual_seed(0)
    seen = torch.tensor([[1, 2, 3, 4, 0], [5, 0, 0, 0, 0]])
    negs = uniform_negatives(6, (2, 200), exclude=seen, generator=g)
    assert set(negs[0].tolist()) == {5, 6}
    assert set(negs[1].tolist()) == {1, 2, 3, 4, 6}
