"""Candidate sets: sampled negatives never hit the positive or history, are seeded, saved and reloaded."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from evalkit import TableScorer, make_set  # noqa: E402

from xdtrain.data.schemas import DataError
from xdtrain.eval.candidates import (
    CandidateSpec,
    EvalSet,
    _draw_rows,
    load_candidates,
    max_negatives,
    prepare_candidates,
    sample_candidates,
    save_candidates,
)
from xdtrain.eval.evaluator import (
    EvalConfig,
    evaluate,
)

# ---------------------------------------------------------------- candidates


@pytest.mark.parametrize("mode", ["uniform:40", "popularity:15"])
def test_candidates_exclude_positive_and_history(mode):
    data = make_set(rows=500, multi=True, counts=True)
    spec = CandidateSpec.parse(mode, seed=3)
    negs = sample_candidates(data, spec).negatives
    idx = np.arange(data.num_rows)
    pos, hist, doms = data.positives(idx), data.history(idx), data.domains_of_rows()
    assert negs.shape == (500, spec.n)
    for r in idx:
        row = set(negs[r].tolist())
        assert len(row) == spec.n  # distinct
        assert not row & set(pos[r].tolist()) and not row & set(hist[r].tolist())
        assert row <= set(data.catalogue[doms[r]].tolist())
        if spec.mode == "popularity":  # never an item without interactions
            counts = data.item_counts[doms[r]][data.index_of(doms[r], negs[r])]
            assert (counts > 0).all()


@pytest.mark.parametrize("mode", ["uniform", "popularity"])
def test_max_negatives_is_the_largest_count_every_row_can_draw(mode):
    data = make_set(rows=300, multi=True, counts=True)
    n = max_negatives(data, CandidateSpec(mode, 1))
    assert n > 0
    sample_candidates(data, CandidateSpec(mode, n))
    with pytest.raises(DataError, match="left to sample"):
        sample_candidates(data, CandidateSpec(mode, n + 1))


def test_same_seed_same_candidates_other_seed_differs():
    data = make_set(rows=300, counts=True)
    for mode in ("uniform:25", "popularity:10"):
        a = sample_candidates(data, CandidateSpec.parse(mode, seed=9)).negatives
        b = sample_candidates(make_set(rows=300, counts=True), CandidateSpec.parse(mode, seed=9)).negatives
        c = sample_candidates(data, CandidateSpec.parse(mode, seed=10)).negatives
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sampling_distributions():
    # One negative per row from 5 items; the target (zero count) is excluded anyway.
    rows = 20000
    cat = {"x": np.array([10, 20, 30, 40, 50])}
    table = pa.table({"user_id": np.arange(rows), "item_id": np.full(rows, 50), "domain": ["x"] * rows})
    data = EvalSet(table, cat, item_counts={"x": np.array([1, 2, 3, 4, 0])})
    for mode, p in (("popularity:1", np.array([1, 2, 3, 4]) / 10), ("uniform:1", np.full(4, 0.25))):
        negs = sample_candidates(data, CandidateSpec.parse(mode)).negatives[:, 0]
        freq = np.array([(negs == i).mean() for i in (10, 20, 30, 40)])
        assert (negs != 50).all()
        assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / rows)), (mode, freq)


def test_candidates_roundtrip_and_refusals(tmp_path):
    data = make_set(rows=200)
    spec = CandidateSpec.parse("uniform:12", seed=2)
    url = str(tmp_path / "cands" / "test.parquet")
    first = prepare_candidates(data, spec, url)  # drawn and written
    assert first.negatives is not None and (tmp_path / "cands" / "test.parquet").exists()
    assert not list((tmp_path / "cands").glob("*.tmp-*"))
    again = prepare_candidates(data, spec, url)  # loaded back
    assert np.array_equal(first.negatives, again.negatives)
    with pytest.raises(DataError, match="drawn with"):
        load_candidates(url, data, CandidateSpec.parse("uniform:12", seed=3))
    with pytest.raises(DataError, match="different eval rows"):
        load_candidates(url, make_set(rows=200, seed=1), spec)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        load_candidates(str(tmp_path / "bad.parquet"), data, spec)
    save_candidates(first, "memory://evaltest/c.parquet")
    assert np.array_equal(
        load_candidates("memory://evaltest/c.parquet", data, spec).negatives, first.negatives
    )
    fsspec.filesystem("memory").rm("/evaltest", recursive=True)


def test_every_model_scored_on_the_saved_candidates(tmp_path):
    data = make_set(rows=100)
    cfg = EvalConfig(candidates="uniform:9", candidates_path=str(tmp_path / "c.parquet"))
    a, b = TableScorer(data), TableScorer(data)
    evaluate(a, data, cfg)
    evaluate(b, data, cfg)
    assert a.calls == b.calls == [(len(c), 10) for c in _batches(data, 256)]
    negs = load_candidates(cfg.candidates_path, data, cfg.spec()).negatives
    assert negs.shape == (100, 9)


def _batches(data: EvalSet, size: int):
    for rows in data.domain_rows().values():
        for s in range(0, len(rows), size):
            yield rows[s : s + size]



def test_stream_sampler_is_exact_sequential_sampling():
    """Both paths of the sampler (vectorized streams, numpy's exact fallback) draw 2 of 4 items
    with P({i, j}) = w_i/W * w_j/(W - w_i) + w_j/W * w_i/(W - w_j)."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    W = w.sum()
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    want = np.array([w[i] / W * w[j] / (W - w[i]) + w[j] / W * w[i] / (W - w[j]) for i, j in pairs])
    rows = 20000
    for rounds in (4, 0):  # 0 rounds: every row takes the exact fallback
        got = _draw_rows(np.random.default_rng(0), 4, w, np.cumsum(w), np.empty(0, np.int64), rows, 2, rounds)
        got.sort(1)
        freq = np.array([((got[:, 0] == i) & (got[:, 1] == j)).mean() for i, j in pairs])
        assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / rows)), (rounds, freq, want)
    # Excluded pairs (keys row * N + item) are never drawn, on either path.
    excl = np.array([0 * 4 + 3, 1 * 4 + 2, 1 * 4 + 3])
    for rounds in (4, 0):
        got = _draw_rows(np.random.default_rng(1), 4, w, np.cumsum(w), excl, 2, 2, rounds)
        assert 3 not in got[0] and sorted(got[1]) == [0, 1]
