"""The model <-> PS contract (xdtrain/nn/sparse.py) and the engine's reference model (SeqRec)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from xdtrain.models import ModelData, build_model
from xdtrain.models.seqrec import SeqRec, SeqRecConfig
from xdtrain.nn import make_backbone
from xdtrain.nn.sparse import PAD_ID, Rows, pull_rows, push_grads
from xdtrain.ps import LocalPS, OptimizerSpec, TableSpec
from xdtrain.reference.trainer import ModelConfig as RefModelConfig
from xdtrain.reference.trainer import Recommender


def test_rows_lookup_gradients_equal_an_embedding_table():
    ids = np.array([3, 10, 42])
    table = torch.nn.Embedding(50, 4)
    rows = Rows(ids, table.weight[ids].detach().clone().requires_grad_(True))
    query = torch.tensor([[42, 3, 3], [10, 42, 3]])
    (rows(query) * torch.arange(4.0)).sum().backward()
    (table(query) * torch.arange(4.0)).sum().backward()
    np.testing.assert_allclose(rows.grad(), table.weight.grad[ids].numpy())


def test_rows_reject_unpulled_ids_and_zero_the_pad():
    rows = Rows(np.array([1, 2]), torch.ones(2, 3), pad=PAD_ID)
    with pytest.raises(KeyError, match=r"\[7\]"):
        rows(torch.tensor([1, 7]))
    padded = Rows(np.array([PAD_ID, 1]), torch.ones(2, 3), pad=PAD_ID)
    out = padded(torch.tensor([PAD_ID, 1]))
    assert out[0].abs().sum() == 0 and out[1].sum() == 3
    with pytest.raises(ValueError, match="sorted"):
        Rows(np.array([2, 1]), torch.ones(2, 3))


def test_pull_push_steps_the_ps_rows_like_sgd():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 3, optimizer=OptimizerSpec("sgd", lr=0.5)))
    ids = torch.tensor([[5, 9], [9, 9]])
    before = ps.pull("t", np.array([5, 9])).clone()
    emb = pull_rows(ps, {"t": ids})
    emb["t"](ids).sum().backward()  # d/d row = number of occurrences
    assert push_grads(ps, emb) == 2
    after = ps.pull("t", np.array([5, 9]))
    np.testing.assert_allclose(after.numpy(), (before - 0.5 * torch.tensor([[1.0], [3.0]])).numpy(), rtol=1e-6)


def test_rows_the_loss_did_not_reach_are_not_pushed_so_adam_leaves_them_alone():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 3, init="normal", init_scale=0.1, optimizer=OptimizerSpec("adam", lr=0.1)))
    for _ in range(2):  # give rows 5 and 9 Adam moments
        emb = pull_rows(ps, {"t": torch.tensor([5, 9])})
        emb["t"](torch.tensor([5, 9])).sum().backward()
        push_grads(ps, emb)
    before = ps.pull("t", np.array([5, 9])).clone()
    emb = pull_rows(ps, {"t": torch.tensor([5, 9])})  # 9 is pulled but used only detached
    (emb["t"](torch.tensor([5])).sum() + 0 * emb["t"](torch.tensor([9])).detach().sum()).backward()
    assert push_grads(ps, emb) == 1
    after = ps.pull("t", np.array([5, 9]))
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def sequences() -> pa.Table:
    rng = np.random.default_rng(0)
    catalogue = np.sort(rng.choice(10_000, 60, replace=False)).astype(np.int64)
    seqs = [list(rng.choice(catalogue, n)) for n in (12, 5, 30, 2, 8)]
    return catalogue, pa.table({"user_id": np.arange(5), "items": pa.array(seqs, pa.list_(pa.int64()))})


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bert4rec"])
def test_seqrec_on_the_ps_computes_the_reference_loss(backbone):
    """Same weights, same batch: the PS-backed model's loss equals the local-table reference model's."""
    catalogue, rows = sequences()
    cfg = SeqRecConfig(backbone=backbone, d=8, max_len=10, layers=1, dropout=0.0)
    model = build_model({"name": "seqrec", "backbone": backbone, "d": 8, "max_len": 10, "layers": 1,
                         "dropout": 0.0}, ModelData(catalogue, ["all"]))
    assert isinstance(model, SeqRec) and model.cfg == cfg
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    batch = model.make_batch(rows, np.random.default_rng(1))
    emb = pull_rows(ps, model.sparse_ids(batch))
    model.eval()
    loss = model(batch, emb)

    ref = Recommender(make_backbone(RefModelConfig(backbone=backbone, d=8, max_len=10, layers=1, dropout=0.0)),
                      len(catalogue), 8)
    ref.backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        ref.items.weight[1:] = ps.pull("item", catalogue)
    dense = {k: (torch.from_numpy(np.searchsorted(catalogue, v.numpy()) + 1) * (v != PAD_ID)
                 if k in ("inputs", "targets", "negatives") else v) for k, v in batch.items()}
    ref.eval()
    expected = ref.loss(dense, "bce", 1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_seqrec_batches_are_a_function_of_the_rng():
    catalogue, rows = sequences()
    model = SeqRec(SeqRecConfig(d=8, max_len=10), catalogue)
    a = model.make_batch(rows, np.random.default_rng(3))
    b = model.make_batch(rows, np.random.default_rng(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = model.sparse_ids(a)["item"]
    assert set(ids.tolist()) <= set(catalogue.tolist())
    with pytest.raises(KeyError, match="not in the catalogue"):
        model.make_batch(pa.table({"user_id": [1], "items": [[catalogue[0], 10_001]]}), np.random.default_rng(0))
