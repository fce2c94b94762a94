"""PreRec's data side: batches (T6 sampling), eval rows, user splits and seen/unseen flags (T11)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from xdtrain.data.evalrows import unseen_flags
from xdtrain.data.popularity import PopFactorsConfig, PopularityIndex
from xdtrain.data.sampler import domain_balanced_indices
from xdtrain.data.schemas import DataError
from xdtrain.data.splits import assign_users
from xdtrain.models.prerec_data import (
    build_batch,
    chunk_sequences,
    eval_rows,
    first_samples,
)
from xdtrain.text.cache import ItemVectors

DAY = 86400


def _seqs(items: list[list[int]], domains: list[str], stamps: list[list[int]] | None = None) -> pa.Table:
    stamps = stamps or [[(i + 1) * DAY for i in range(len(s))] for s in items]
    return pa.table({"user_id": np.arange(len(items), dtype=np.int64), "domain": domains,
                     "items": pa.array(items, pa.list_(pa.int64())),
                     "timestamps": pa.array(stamps, pa.list_(pa.int64()))})


def _text() -> ItemVectors:
    rng = np.random.default_rng(0)
    return ItemVectors({"a": (np.arange(1, 41), rng.normal(size=(40, 4))),
                        "b": (np.arange(101, 111), rng.normal(size=(10, 4)))})


def test_batch_layout_by_hand():
    text = _text()
    rows = _seqs([[1, 2, 3, 4], [105, 101]], ["a", "b"], [[0, DAY, 2 * DAY, 9 * DAY], [DAY, 5 * DAY]])
    inter = pa.table({"item_id": [1, 2, 2, 3, 105], "domain": ["a", "a", "a", "a", "b"],
                      "timestamp": [0, 0, DAY, 3 * DAY, 0]})
    pop = PopularityIndex.from_table(inter, PopFactorsConfig(alignment="sliding", window_days=5), {"a": 40, "b": 10})
    b = build_batch(rows, np.random.default_rng(0), domains=["a", "b"], text=text, popularity=pop,
                    max_len=2, negatives=3)
    # row 0 keeps its last 3 items (2, 3, 4): inputs 2, 3 -> targets 3, 4; row 1: input 105 -> target 101
    assert b["mask"].tolist() == [[True, True], [True, False]]
    assert b["tmask"].tolist() == [[True, True], [True, False]]
    assert b["dom"].tolist() == [0, 1] and b["tdom"].tolist() == [0, 0, 1]
    uniq_vec = b["text"].numpy()

    def raw(idx, dom):
        cat, vec = text.catalogue(dom), text.vectors(dom)
        return [int(cat[np.nonzero((vec == uniq_vec[i]).all(1))[0][0]]) for i in np.asarray(idx).ravel()]

    assert raw(b["hist"][0], "a") == [2, 3] and raw(b["hist"][1, :1], "b") == [105]
    assert raw(b["target"][:2], "a") == [3, 4] and raw(b["target"][2:], "b") == [101]
    # popularity at each target's day: target 3 on day 2 sees days [-3, 2): item 3 never; target 4 on day 9
    # sees [4, 9): nothing -> 0; target 101 on day 5 sees [0, 5): 105 once, 101 never
    assert (b["pop_pos"] == 0).all()
    negs_b = raw(b["neg"][2], "b")
    np.testing.assert_allclose(b["pop_neg"][2, :, 0].numpy(), [1.0 if i == 105 else 0.0 for i in negs_b], atol=1e-6)
    assert len(np.unique(b["key"].numpy())) == len(b["key"])


def test_t6_negatives_are_uniform_same_domain_and_sampler_is_domain_balanced():
    text = _text()
    rows = _seqs([[1, 2, 3]] * 30 + [[101, 102]] * 10, ["a"] * 30 + ["b"] * 10)
    rng = np.random.default_rng(1)
    counts = {"a": np.zeros(40), "b": np.zeros(10)}
    for _ in range(20):
        b = build_batch(rows, rng, domains=["a", "b"], text=text, popularity=None, max_len=5, negatives=255)
        assert b["neg"].shape == (70, 255)
        vec = b["text"].numpy()
        for dom in ("a", "b"):
            sel = (b["tdom"] == ["a", "b"].index(dom)).numpy()
            cat = text.vectors(dom)
            idx = np.unique(b["neg"][sel].numpy(), return_inverse=True)
            which = np.array([np.nonzero((cat == vec[i]).all(1))[0] for i in idx[0]])
            assert which.shape == (len(idx[0]), 1)  # every negative is an item of the target's own domain
            counts[dom] += np.bincount(which[idx[1], 0], minlength=len(cat))
    for dom, c in counts.items():
        assert stats.chisquare(c).pvalue > 1e-3, dom  # uniform over the catalogue
    doms = np.array(["a"] * 900 + ["b"] * 90 + ["c"] * 10, dtype=object)
    draws = doms[domain_balanced_indices(doms, 100_000, np.random.default_rng(0))]
    share = np.array([(draws == d).mean() for d in "abc"])
    np.testing.assert_allclose(share, 1 / 3, atol=0.01)


def test_batch_errors_name_the_problem():
    text = _text()
    with pytest.raises(DataError, match=r"domain\(s\) \['c'\]"):
        build_batch(_seqs([[1, 2]], ["c"]), np.random.default_rng(0), domains=["a"], text=text, popularity=None,
                    max_len=4, negatives=2)
    with pytest.raises(DataError, match="item 77 of domain 'a' has no text vector"):
        build_batch(_seqs([[1, 77]], ["a"]), np.random.default_rng(0), domains=["a"], text=text, popularity=None,
                    max_len=4, negatives=2)


def test_max_targets_per_row():
    text = _text()
    rows = _seqs([list(range(1, 21)), [1, 2, 3]], ["a", "a"])
    b = build_batch(rows, np.random.default_rng(0), domains=["a"], text=text, popularity=None, max_len=10,
                    negatives=2, max_targets_per_row=4)
    assert b["tmask"].sum(1).tolist() == [4, 2]


def test_eval_rows_chunks_and_first_samples():
    seqs = _seqs([[1, 2, 3, 4], [9], [5, 6]], ["a", "a", "b"])
    ev = eval_rows(seqs, max_len=2)
    assert ev["user_id"].to_pylist() == [0, 0, 0, 2]
    assert ev["item_id"].to_pylist() == [2, 3, 4, 6]
    assert ev["history"].to_pylist() == [[1], [1, 2], [2, 3], [5]]
    assert ev["timestamp"].to_pylist() == [2 * DAY, 3 * DAY, 4 * DAY, 2 * DAY]
    last = eval_rows(seqs, max_len=2, last_only=True)
    assert last["item_id"].to_pylist() == [4, 6] and last["history"].to_pylist() == [[2, 3], [5]]

    long = _seqs([list(range(1, 9)), [1, 2]], ["a", "a"])
    ch = chunk_sequences(long, max_len=3)
    assert ch["items"].to_pylist() == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8], [1, 2]]
    assert ch["user_id"].to_pylist() == [0, 0, 0, 1]
    targets = sum(len(x) - 1 for x in ch["items"].to_pylist())
    assert targets == 7 + 1  # every target exactly once

    fs = first_samples(long, 5)
    assert fs["items"].to_pylist() == [[1, 2, 3, 4, 5, 6]]
    assert first_samples(long, 8)["items"].to_pylist() == [list(range(1, 9)), [1, 2]]
    assert first_samples(long, 100).num_rows == 2


def test_t11_user_split_and_unseen_flags():
    users = np.arange(100_000)
    part = assign_users(users, (0.4, 0.3, 0.3), seed=2023)
    np.testing.assert_allclose(np.bincount(part) / len(users), [0.4, 0.3, 0.3], atol=0.01)
    assert np.array_equal(part, assign_users(users, (0.4, 0.3, 0.3), seed=2023))  # same seed, same split
    assert not np.array_equal(part, assign_users(users, (0.4, 0.3, 0.3), seed=7))
    # each user is in exactly one part: disjoint by construction of a per-user label

    rng = np.random.default_rng(0)
    rows = pa.table({"user_id": rng.integers(0, 50, 400), "item_id": rng.integers(0, 80, 400)})
    src_users, src_items = rng.choice(50, 20, replace=False), rng.choice(80, 30, replace=False)
    got = unseen_flags(rows, src_users, src_items)
    want = [u not in set(src_users) and i not in set(src_items)
            for u, i in zip(rows["user_id"].to_pylist(), rows["item_id"].to_pylist())]
    assert got.tolist() == want and 0 < got.sum() < 400
