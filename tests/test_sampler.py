"""Domain-balanced sampling (xdtrain/data/sampler.py) and its place in the engine's streams. Fast, no Ray.

Every row carries a unique `user_id` (its global row number), so drawn rows can be traced.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from xdtrain.data.reader import ParquetStreamReader
from xdtrain.data.sampler import BalancedSampleReader, split_counts
from xdtrain.data.schemas import DataError
from xdtrain.nn.program import StreamSpec, resolve_program
from xdtrain.train.streams import Dataset, Stream

SIZES = {"a": 900, "b": 90, "c": 10}  # 90:9:1, as spec T6's "about 1/|K| over 10^5 draws"
N = sum(SIZES.values())


def write(path: Path, sizes: dict[str, int] = SIZES, row_group: int = 50, mixed: bool = True,
          domain: bool = True) -> str:
    """A `sequences` dataset of one-item rows; `mixed`: domains interleaved (as the recipes write rows
    in user order), else sorted by domain, so that row groups and shards are single-domain."""
    doms = np.concatenate([[d] * n for d, n in sizes.items()])
    if mixed:
        doms = doms[np.random.default_rng(0).permutation(len(doms))]
    n = len(doms)
    cols = {"user_id": pa.array(np.arange(n), pa.int64()),
            "items": pa.array([[int(i)] for i in range(n)], pa.list_(pa.int64()))}
    if domain:
        cols["domain"] = pa.array(doms.tolist(), pa.string())
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path / "part-0.parquet", row_group_size=row_group)
    return str(path)


def ids(reader) -> list[int]:
    return [i for b in reader for i in b.column("user_id").to_pylist()]


def domains_of(path: str) -> np.ndarray:
    return np.asarray(pq.read_table(path, columns=["domain"])["domain"].to_pylist(), dtype=object)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("sampler") / "mixed")


@pytest.fixture(scope="module")
def sorted_ds(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("sampler") / "sorted", row_group=100, mixed=False)


def test_each_domain_is_drawn_with_probability_one_over_k(mixed):
    """100k draws over 2 ranks: each domain ~1/3, in every batch position, and uniform within its domain."""
    dom = domains_of(mixed)
    readers = [BalancedSampleReader(mixed, batch_size=64, seed=3, world_size=2, rank=r) for r in range(2)]
    drawn, first = [], []
    for epoch in range(100):
        per_epoch = []
        for r in readers:
            r.set_epoch(epoch)
            batches = [b.column("user_id").to_numpy() for b in r]
            first.append(batches[0])
            per_epoch.append(np.concatenate(batches))
        got = np.concatenate(per_epoch)
        assert len(got) == N  # an epoch draws as many rows as the dataset has
        counts = Counter(dom[got])
        assert all(abs(counts[d] - N / 3) <= 1 for d in SIZES), counts  # stratified: exact per epoch
        drawn.append(got)
    drawn = np.concatenate(drawn)
    assert len(drawn) == 100_000
    share = np.array([(dom[drawn] == d).mean() for d in SIZES])
    np.testing.assert_allclose(share, 1 / 3, atol=0.005)
    lead = dom[np.concatenate(first)]  # the first batch of each epoch mixes domains like the whole
    assert stats.chisquare([(lead == d).sum() for d in SIZES]).pvalue > 1e-3
    for d in SIZES:  # every row of a domain equally likely
        rows = np.flatnonzero(dom == d)
        hits = np.bincount(drawn, minlength=N)[rows]
        assert stats.chisquare(hits).pvalue > 1e-3, d
    assert readers[0].num_rows() + readers[1].num_rows() == N
    assert readers[0].domains == ["a", "b", "c"] and readers[0].domain_rows.tolist() == [900, 90, 10]


def test_cursor_resume_reproduces_the_exact_draws(mixed):
    whole = BalancedSampleReader(mixed, batch_size=32, seed=5, world_size=2, rank=1)
    want = ids(whole)
    assert len(want) == whole.epoch_rows() and len(whole) == -(-len(want) // 32)
    part = BalancedSampleReader(mixed, batch_size=32, seed=5, world_size=2, rank=1)
    it = iter(part)
    got = [i for _ in range(3) for i in next(it).column("user_id").to_pylist()]
    state = part.state_dict()
    assert state["rows_emitted"] == 96 and state["sampler"] == "domain_balanced"
    again = BalancedSampleReader(mixed, batch_size=7, seed=5, world_size=2, rank=1)  # batch size may differ
    again.load_state_dict(state)
    assert got + ids(again) == want
    assert ids(again) == []  # the epoch is done
    again.set_epoch(1)
    whole.set_epoch(1)
    nxt = ids(again)
    assert nxt == ids(whole) and nxt != want  # a new epoch draws anew, the same on every run
    other = BalancedSampleReader(mixed, batch_size=32, seed=6, world_size=2, rank=1)
    assert ids(other) != want  # the seed matters
    with pytest.raises(ValueError, match="seed=5 but this reader has 6"):
        other.load_state_dict(state)
    plain = ParquetStreamReader(mixed, "sequences", batch_size=32, seed=5, world_size=2, rank=1)
    with pytest.raises(ValueError, match="sampler"):  # neither reader takes the other's cursor
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match="sampler"):
        again.load_state_dict(plain.state_dict())


def test_two_ranks_use_the_same_weights_even_on_single_domain_shards(sorted_ds):
    """Row groups sorted by domain: rank 0 holds only `a`. The epoch is still balanced over the ranks
    together, and a row of `a` is drawn as often on either rank (the global weights)."""
    dom = domains_of(sorted_ds)
    readers = [BalancedSampleReader(sorted_ds, batch_size=50, seed=1, world_size=2, rank=r) for r in range(2)]
    shard = [np.asarray(ids_of_shard(r)) for r in readers]
    assert set(dom[shard[0]]) == {"a"} and set(dom[shard[1]]) == {"a", "b", "c"}
    for r in readers:
        assert r.domains == ["a", "b", "c"] and r.domain_rows.tolist() == [900, 90, 10]
    draws = [np.asarray(ids(r)) for r in readers]
    counts = Counter(dom[np.concatenate(draws)])
    assert sum(counts.values()) == N and all(abs(counts[d] - N / 3) <= 1 for d in SIZES), counts
    rate = [(dom[d] == "a").sum() / (dom[s] == "a").sum() for d, s in zip(draws, shard)]  # draws per row of a
    assert rate[0] == pytest.approx(rate[1], abs=0.01) and rate[0] == pytest.approx(N / 3 / 900, abs=0.01)
    assert [r.num_rows() for r in readers] == [500, 500] and [len(d) for d in draws] == [186, 814]


def ids_of_shard(reader: BalancedSampleReader) -> list[int]:
    shard, _ = reader._load()
    return shard.column("user_id").to_pylist()


def test_split_counts_is_exact_and_proportional():
    rows = np.array([[450, 450, 0], [0, 45, 45], [1, 0, 9]])
    out = split_counts(np.array([334, 333, 333]), rows)
    assert out.sum(axis=1).tolist() == [334, 333, 333] and out[0, 2] == 0 and out[1, 0] == 0
    assert out[0].tolist() == [167, 167, 0] and out[2].tolist() == [33, 0, 300]
    with pytest.raises(ValueError, match="no rank holds"):
        split_counts(np.array([1]), np.array([[0, 0]]))


@pytest.mark.parametrize("new_world", [3, 1])
def test_elastic_resume_continues_the_epoch_with_the_remaining_draws(mixed, new_world):
    """2 ranks stop mid-epoch; `new_world` ranks draw, per domain, exactly what the old ranks had left."""
    dom = domains_of(mixed)
    old = [BalancedSampleReader(mixed, batch_size=40, seed=2, world_size=2, rank=r) for r in range(2)]
    full = [list(r.draws()) for r in old]
    for r, k in zip(old, (3, 5)):
        it = iter(r)
        for _ in range(k):
            next(it)
    left = Counter(dom[np.concatenate([np.asarray(ids_of_shard(r))[f[r._rows_emitted:]]
                                       for r, f in zip(old, full)])])
    states = [r.state_dict() for r in old]
    new = [BalancedSampleReader(mixed, batch_size=40, seed=2, world_size=new_world, rank=r)
           for r in range(new_world)]
    for r in new:
        r.load_global_state(states)
        assert r.epoch == 0 and r.state_dict()["elastic"] == [{"world_size": 2, "rows": [120, 200]}]
    got = [np.asarray(ids(r)) for r in new]
    assert Counter(dom[np.concatenate(got)]) == left
    again = BalancedSampleReader(mixed, batch_size=40, seed=2, world_size=new_world, rank=0)
    again.load_global_state(states)  # the resumed epoch's cursor itself resumes
    it = iter(again)
    head = next(it).column("user_id").to_pylist()
    mid = BalancedSampleReader(mixed, batch_size=40, seed=2, world_size=new_world, rank=0)
    mid.load_state_dict(again.state_dict())
    assert head + ids(mid) == got[0].tolist()
    for r in new:  # the next epoch is ordinary
        r.set_epoch(1)
    assert sum(len(ids(r)) for r in new) == N
    with pytest.raises(ValueError, match="rows_emitted=999 outside"):
        bad = [dict(s) for s in states]
        bad[0]["rows_emitted"] = 999
        new[0].load_global_state(bad)


def test_bad_input_names_the_file(tmp_path):
    url = write(tmp_path / "nodomain", domain=False)
    with pytest.raises(DataError, match=r"part-0\.parquet: no 'domain' column .*train_by_domain"):
        BalancedSampleReader(url, batch_size=8)
    with pytest.raises(DataError, match="gets no data"):
        BalancedSampleReader(write(tmp_path / "one", {"a": 3}), world_size=2, rank=1)


class Rows:
    """A model whose batch is its rows (the stream's own behaviour is what is tested)."""

    def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict:
        return {"ids": rows["user_id"].to_pylist()}


def test_streams_pick_the_reader_by_sampler_and_the_default_is_unchanged(mixed):
    kw = dict(world=2, rank=0, seed=4, shuffle_buffer=128)
    plain = Stream("train", StreamSpec(batch_size=64), Dataset(mixed), Rows(), **kw)
    assert type(plain.reader) is ParquetStreamReader
    ref = ParquetStreamReader(mixed, "sequences", batch_size=32, shuffle_buffer=128, seed=4, world_size=2, rank=0)
    assert "sampler" not in plain.cursor()
    got = []
    while (b := plain.read()) is not None:
        got += b[0]["ids"]
    assert got == ids(ref) and plain.cursor() == ref.state_dict()

    bal = Stream("train", StreamSpec(batch_size=64, sampler="domain_balanced"), Dataset(mixed), Rows(), **kw)
    assert type(bal.reader) is BalancedSampleReader
    want = ids(BalancedSampleReader(mixed, batch_size=32, seed=4, world_size=2, rank=0))
    got = []
    while (b := bal.read()) is not None:
        got += b[0]["ids"]
    assert got == want and bal.cursor()["sampler"] == "domain_balanced"
    bal.restore([dict(bal.cursor(), rows_emitted=0, epoch=0)] * 2)  # world 2 from rank cursors
    assert bal.epoch == 0


def test_program_refuses_an_unknown_sampler():
    class M:
        def streams(self):
            return {"train": StreamSpec(sampler="balanced")}

    with pytest.raises(ValueError, match="sampler.*'balanced'"):
        resolve_program(M(), batch_size=8, epochs=1, patience=0, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
