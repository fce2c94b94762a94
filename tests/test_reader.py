"""Streaming Parquet reader: sharding, batching, seeded bounded shuffle, and an exactly-once cursor.

Every row carries a unique id (`user_id` = its global row number), so a multiset of ids proves
that no row is skipped or read twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.data.reader import ParquetStreamReader, list_units, shard_units
from xdtrain.data.schemas import DataError
from xdtrain.data.validate import Unit

# Rows per file and row-group size: uneven on purpose (short last row groups, one single-group file).
FILE_ROWS = [230, 57, 400, 120, 301]
ROW_GROUP = 64
TOTAL = sum(FILE_ROWS)


def write_dataset(
    url: str, file_rows=FILE_ROWS, row_group=ROW_GROUP, dictionary_domain: bool = False
) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    start = 0
    for f, n in enumerate(file_rows):
        ids = np.arange(start, start + n, dtype=np.int64)
        domain = pa.array(np.where(ids % 3 == 0, "books", "movies").tolist())
        if dictionary_domain:  # each file orders its dictionary differently: concatenation must unify
            order = ["books", "movies"] if f % 2 else ["movies", "books"]
            codes = pa.array([order.index(s) for s in domain.to_pylist()], pa.int32())
            domain = pa.DictionaryArray.from_arrays(codes, pa.array(order))
        t = pa.table({"user_id": ids, "item_id": ids % 17, "domain": domain, "timestamp": ids * 10})
        with fs.open(f"{root}/part-{f:03d}.parquet", "wb") as fh:
            pq.write_table(t, fh, row_group_size=row_group)
        start += n


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("reader") / "log")
    write_dataset(url)
    return url


@pytest.fixture
def memory_ds(request) -> str:
    url = f"memory://reader-{request.node.name}"
    write_dataset(url)
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b.column("user_id").to_pylist()]


def test_units_follow_files_and_row_groups(local_ds):
    units = list_units(local_ds)
    expected = [-(-n // ROW_GROUP) for n in FILE_ROWS]  # 4, 1, 7, 2, 5 row groups
    assert len(units) == sum(expected) == 19
    assert [u.path.rsplit("/", 1)[-1] for u in units][:5] == ["part-000.parquet"] * 4 + ["part-001.parquet"]
    assert [u.num_rows for u in units[:5]] == [64, 64, 64, 38, 57]
    assert sum(u.num_rows for u in units) == TOTAL


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_are_disjoint_complete_and_balanced(local_ds, world_size):
    units = list_units(local_ds)
    shards = [shard_units(units, world_size, r) for r in range(world_size)]
    seen = Counter((u.path, u.row_group) for s in shards for u in s)
    assert set(seen) == {(u.path, u.row_group) for u in units} and max(seen.values()) == 1
    rows = [sum(u.num_rows for u in s) for s in shards]
    assert max(rows) - min(rows) <= ROW_GROUP  # greedy balance: within one row group
    # Each rank's reader yields exactly its shard's rows, and num_rows() says so up front.
    all_ids = []
    for r in range(world_size):
        reader = ParquetStreamReader(local_ds, batch_size=50, world_size=world_size, rank=r)
        got = ids_of(reader)
        assert len(got) == reader.num_rows() == rows[r]
        all_ids += got
    assert sorted(all_ids) == list(range(TOTAL))


def test_greedy_sharding_by_hand():
    units = [Unit("a", 0, 10), Unit("a", 1, 3), Unit("b", 0, 8), Unit("b", 1, 6)]
    # largest first: 10 -> r0, 8 -> r1, 6 -> r1 (8 < 10), 3 -> r0 (10 < 14)
    assert shard_units(units, 2, 0) == [units[0], units[1]]
    assert shard_units(units, 2, 1) == [units[2], units[3]]
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        shard_units(units, 2, 2)


def test_no_shuffle_is_file_order_with_full_batches(local_ds):
    reader = ParquetStreamReader(local_ds, batch_size=100)
    batches = list(reader)
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert [b.num_rows for b in batches] == [100] * 11 + [8]  # batches span row groups and files
    assert len(reader) == 12
    assert ids_of(batches) == list(range(TOTAL))
    assert batches[0].schema.names == ["user_id", "item_id", "domain", "timestamp"]


def test_column_projection(local_ds):
    reader = ParquetStreamReader(local_ds, batch_size=256, columns=["timestamp", "user_id"])
    batches = list(reader)
    assert batches[0].schema.names == ["timestamp", "user_id"]
    assert [t for b in batches for t in b.column("timestamp").to_pylist()] == [10 * i for i in range(TOTAL)]


def test_shuffle_is_seeded_by_seed_and_epoch(local_ds):
    def order(seed: int, epoch: int) -> list[int]:
        reader = ParquetStreamReader(local_ds, batch_size=64, shuffle_buffer=200, seed=seed)
        reader.set_epoch(epoch)
        return ids_of(reader)

    a = order(7, 0)
    assert sorted(a) == list(range(TOTAL)) and a != list(range(TOTAL))
    assert order(7, 0) == a  # deterministic
    assert order(7, 1) != a and sorted(order(7, 1)) == sorted(a)  # new epoch, new order
    assert order(8, 0) != a


def test_shuffle_is_bounded_by_windows(local_ds):
    reader = ParquetStreamReader(local_ds, batch_size=64, shuffle_buffer=200, seed=3)
    windows = reader.windows(0)
    sizes = [sum(u.num_rows for u in w) for w in windows]
    assert max(sizes) <= 200 and sum(sizes) == TOTAL
    assert sorted((u.path, u.row_group) for w in windows for u in w) == sorted(
        (u.path, u.row_group) for u in reader.units
    )
    # The i-th window's rows are emitted as one contiguous stretch, and within it they are shuffled.
    got = ids_of(reader)
    pos = 0
    for w, size in zip(windows, sizes):
        expected = sorted(r for u in w for r in _unit_ids(u))
        assert sorted(got[pos : pos + size]) == expected
        pos += size
    assert got[: sizes[0]] != sorted(got[: sizes[0]])


def _unit_ids(u: Unit) -> range:
    f = int(u.path.rsplit("-", 1)[-1].split(".")[0])
    start = sum(FILE_ROWS[:f]) + u.row_group * ROW_GROUP
    return range(start, start + u.num_rows)


def test_row_group_larger_than_buffer_is_its_own_window(local_ds):
    reader = ParquetStreamReader(local_ds, batch_size=10, shuffle_buffer=5, seed=0)
    assert all(len(w) == 1 for w in reader.windows(0))
    assert sorted(ids_of(reader)) == list(range(TOTAL))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle_buffer", [0, 150, 10_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_at_random_points_is_exactly_once(local_ds, world_size, shuffle_buffer, seed):
    rng = np.random.default_rng([seed, world_size, shuffle_buffer])
    for rank in range(world_size):
        kw = dict(
            batch_size=int(rng.integers(1, 90)),
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            world_size=world_size,
            rank=rank,
        )
        full = ids_of(ParquetStreamReader(local_ds, **kw))
        for _ in range(3):
            reader = ParquetStreamReader(local_ds, **kw)
            n_batches = len(reader)
            stop = int(rng.integers(0, n_batches + 1))  # 0 = before any batch, n = after the last
            it = iter(reader)
            before = ids_of(next(it) for _ in range(stop))
            state = json.loads(json.dumps(reader.state_dict()))
            del it, reader  # the interrupted reader is gone
            restored = ParquetStreamReader(local_ds, **kw)
            restored.load_state_dict(state)
            after = ids_of(restored)
            assert Counter(before) + Counter(after) == Counter(full)
            assert before + after == full  # same order as the uninterrupted run


def test_resume_with_a_different_batch_size_and_across_epochs(local_ds):
    kw = dict(shuffle_buffer=300, seed=5)
    ref = ParquetStreamReader(local_ds, batch_size=40, **kw)
    ref.set_epoch(2)
    full = ids_of(ref)
    reader = ParquetStreamReader(local_ds, batch_size=40, **kw)
    reader.set_epoch(2)
    it = iter(reader)
    before = ids_of(next(it) for _ in range(7))
    restored = ParquetStreamReader(local_ds, batch_size=33, **kw)
    restored.load_state_dict(reader.state_dict())
    restored.set_epoch(2)  # the training loop re-announces the current epoch: the cursor stays
    assert before + ids_of(restored) == full
    assert ids_of(restored) == []  # the epoch is done until the next set_epoch
    restored.set_epoch(3)
    assert sorted(ids_of(restored)) == list(range(TOTAL))


def test_restore_in_another_process(local_ds):
    kw = dict(batch_size=64, shuffle_buffer=250, seed=11, world_size=2, rank=1)
    full = ids_of(ParquetStreamReader(local_ds, **kw))
    reader = ParquetStreamReader(local_ds, **kw)
    it = iter(reader)
    before = ids_of(next(it) for _ in range(4))
    code = (
        "import json, sys\n"
        "from xdtrain.data.reader import ParquetStreamReader\n"
        "url, kw, state = json.loads(sys.argv[1])\n"
        "r = ParquetStreamReader(url, **kw)\n"
        "r.load_state_dict(state)\n"
        "print(json.dumps([i for b in r for i in b.column('user_id').to_pylist()]))\n"
    )
    arg = json.dumps([local_ds, kw, reader.state_dict()])
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True)
    assert before + json.loads(out.stdout) == full


def test_state_from_another_configuration_is_refused(local_ds):
    state = ParquetStreamReader(local_ds, shuffle_buffer=100, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"reader state has seed=1 but this reader has 2"):
        ParquetStreamReader(local_ds, shuffle_buffer=100, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"reader state has world_size=1 but this reader has 2"):
        ParquetStreamReader(local_ds, shuffle_buffer=100, seed=1, world_size=2).load_state_dict(state)


def test_memory_url_matches_local(local_ds, memory_ds):
    kw = dict(batch_size=70, shuffle_buffer=180, seed=4, world_size=2, rank=0)
    assert ids_of(ParquetStreamReader(memory_ds, **kw)) == ids_of(ParquetStreamReader(local_ds, **kw))
    assert len(list_units(memory_ds)) == 19


def test_dictionary_columns_from_different_files_are_unified(tmp_path):
    url = str(tmp_path / "dict")
    write_dataset(url, file_rows=[90, 90, 90], row_group=30, dictionary_domain=True)
    reader = ParquetStreamReader(url, batch_size=50, shuffle_buffer=100, seed=0)
    assert pa.types.is_dictionary(reader.schema.field("domain").type)
    rows = [r for b in reader for r in b.to_pylist()]
    assert len(rows) == 270
    assert all(r["domain"] == ("books" if r["user_id"] % 3 == 0 else "movies") for r in rows)


def test_more_ranks_than_row_groups_is_an_error(tmp_path):
    url = str(tmp_path / "tiny")
    write_dataset(url, file_rows=[10], row_group=10)
    with pytest.raises(DataError, match=r"rank 1 of 2 gets no data, the dataset has only 1 row group"):
        ParquetStreamReader(url, world_size=2, rank=1)


def test_without_prefetch_same_rows(local_ds):
    kw = dict(batch_size=64, shuffle_buffer=250, seed=1)
    assert ids_of(ParquetStreamReader(local_ds, prefetch=0, **kw)) == ids_of(
        ParquetStreamReader(local_ds, **kw)
    )


@pytest.mark.parametrize("shuffle_buffer", [0, 10_000])
def test_memory_is_bounded_by_the_windows_not_the_data(tmp_path, shuffle_buffer):
    url = str(tmp_path / "big")
    write_dataset(url, file_rows=[5000] * 40, row_group=2500)  # 200k rows
    reader = ParquetStreamReader(url, batch_size=1000, shuffle_buffer=shuffle_buffer, seed=0, prefetch=2)
    data_bytes = 200_000 * (8 + 8 + 8) + 200_000  # three int64 columns + the domain column, at least
    window_bytes = max(shuffle_buffer, 2500) * 40  # rows x generous bytes per row
    base, peak, rows = pa.total_allocated_bytes(), 0, 0
    for b in reader:
        rows += b.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == 200_000
    assert peak < 6 * window_bytes < data_bytes  # current + prefetched windows and their copies


# --- elastic resume: another world size picks up the epoch's unconsumed rows ----------------------


def consume(url: str, world: int, stops: list[int], epoch: int = 0, **kw) -> tuple[list[int], list[dict]]:
    """Each rank of `world` yields `stops[rank]` batches of `epoch`; returns the ids seen and all states."""
    seen, states = [], []
    for rank in range(world):
        reader = ParquetStreamReader(url, world_size=world, rank=rank, **kw)
        reader.set_epoch(epoch)
        it = iter(reader)
        seen += ids_of(next(it) for _ in range(stops[rank]))
        states.append(json.loads(json.dumps(reader.state_dict())))
    return seen, states


def resume_on(url: str, world: int, states: list[dict], **kw) -> list[ParquetStreamReader]:
    readers = [ParquetStreamReader(url, world_size=world, rank=r, **kw) for r in range(world)]
    for reader in readers:
        reader.load_global_state(states)
    return readers


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("shuffle_buffer", [0, 150])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elastic_resume_is_exactly_once_then_normal(local_ds, old_world, new_world, shuffle_buffer, seed):
    rng = np.random.default_rng([seed, old_world, new_world, shuffle_buffer])
    kw = dict(shuffle_buffer=shuffle_buffer, seed=seed)
    old_bs = int(rng.integers(1, 90))
    lens = [
        len(ParquetStreamReader(local_ds, batch_size=old_bs, world_size=old_world, rank=r, **kw))
        for r in range(old_world)
    ]
    stops = [int(rng.integers(1, n)) for n in lens]  # every old rank is mid-epoch
    before, states = consume(local_ds, old_world, stops, epoch=1, batch_size=old_bs, **kw)

    readers = resume_on(local_ds, new_world, states, batch_size=int(rng.integers(1, 90)), **kw)
    after = [ids_of(r) for r in readers]
    assert Counter(before) + Counter(i for a in after for i in a) == Counter(range(TOTAL))
    assert [len(a) for a in after] == [r.epoch_rows() for r in readers]
    assert max(map(len, after)) - min(map(len, after)) <= 1  # equal shares of the remainder
    assert all(ids_of(r) == [] for r in readers)  # the epoch is done until the next set_epoch

    for rank, reader in enumerate(readers):  # the next epoch is an ordinary one on the new world
        reader.set_epoch(2)
        assert reader.state_dict()["elastic"] == []
        fresh = ParquetStreamReader(
            local_ds, batch_size=reader.batch_size, world_size=new_world, rank=rank, **kw
        )
        fresh.set_epoch(2)
        assert ids_of(reader) == ids_of(fresh)


def test_elastic_resume_without_shuffle_by_hand(local_ds):
    # Two old ranks stop after 3 and 1 batches of 50; one new rank yields rank 0's tail, then rank 1's.
    full = [ids_of(ParquetStreamReader(local_ds, batch_size=50, world_size=2, rank=r)) for r in range(2)]
    before, states = consume(local_ds, 2, [3, 1], batch_size=50)
    assert before == full[0][:150] + full[1][:50]
    (one,) = resume_on(local_ds, 1, states, batch_size=100)
    assert ids_of(one) == full[0][150:] + full[1][50:]
    # One old rank stops after 250 rows; two new ranks split the rest in order, halves within a row.
    solo = ids_of(ParquetStreamReader(local_ds, batch_size=50))
    _, states = consume(local_ds, 1, [5], batch_size=50)
    a, b = (ids_of(r) for r in resume_on(local_ds, 2, states, batch_size=64))
    assert a + b == solo[250:] and (len(a), len(b)) == (429, 429)  # (1108 - 250) / 2


def test_elastic_resume_twice_in_one_epoch(local_ds):
    # 2 -> 3 -> 1 within epoch 0, each world interrupted mid-way; the state stays a few numbers.
    kw = dict(shuffle_buffer=150, seed=9)
    before, states = consume(local_ds, 2, [4, 2], batch_size=30, **kw)
    middle = resume_on(local_ds, 3, states, batch_size=20, **kw)
    states = []
    for reader, stop in zip(middle, [3, 0, 5]):
        it = iter(reader)
        before += ids_of(next(it) for _ in range(stop))
        states.append(json.loads(json.dumps(reader.state_dict())))
    assert states[0]["elastic"] == [{"world_size": 2, "rows": [120, 60]}]
    (last,) = resume_on(local_ds, 1, states, batch_size=64, **kw)
    assert last.state_dict()["elastic"] == [
        {"world_size": 2, "rows": [120, 60]},
        {"world_size": 3, "rows": [60, 0, 100]},
    ]
    assert len(json.dumps(last.state_dict())) < 400
    assert Counter(before) + Counter(ids_of(last)) == Counter(range(TOTAL))


def test_a_resumed_epoch_resumes_on_the_same_world(local_ds):
    kw = dict(shuffle_buffer=150, seed=4)
    _, states = consume(local_ds, 3, [2, 5, 1], batch_size=40, **kw)
    reference = [ids_of(r) for r in resume_on(local_ds, 2, states, batch_size=40, **kw)]
    reader = resume_on(local_ds, 2, states, batch_size=40, **kw)[1]
    it = iter(reader)
    head = ids_of(next(it) for _ in range(3))
    restored = ParquetStreamReader(local_ds, batch_size=25, world_size=2, rank=1, **kw)
    restored.load_state_dict(json.loads(json.dumps(reader.state_dict())))
    assert head + ids_of(restored) == reference[1]  # same order as the uninterrupted resumed epoch
    again = ParquetStreamReader(local_ds, batch_size=40, world_size=2, rank=1, **kw)
    again.load_global_state(
        [reader.state_dict(), resume_on(local_ds, 2, states, batch_size=40, **kw)[0].state_dict()]
    )
    assert head + ids_of(again) == reference[1]  # same world size: load_global_state == load_state_dict


def test_elastic_resume_at_an_epoch_start_is_an_ordinary_epoch(local_ds):
    kw = dict(batch_size=64, shuffle_buffer=150, seed=3)
    _, states = consume(local_ds, 2, [0, 0], epoch=5, **kw)
    for rank, reader in enumerate(resume_on(local_ds, 3, states, **kw)):
        fresh = ParquetStreamReader(local_ds, world_size=3, rank=rank, **kw)
        fresh.set_epoch(5)
        assert reader.state_dict()["elastic"] == [] and ids_of(reader) == ids_of(fresh)


def test_elastic_resume_when_one_rank_already_moved_to_the_next_epoch(local_ds):
    kw = dict(batch_size=50, shuffle_buffer=150, seed=2)
    r0 = ParquetStreamReader(local_ds, world_size=2, rank=0, **kw)
    ids_of(r0)  # rank 0 finished epoch 0 ...
    r0.set_epoch(1)  # ... and announced epoch 1
    full1 = ids_of(ParquetStreamReader(local_ds, world_size=2, rank=1, **kw))
    r1 = ParquetStreamReader(local_ds, world_size=2, rank=1, **kw)
    it = iter(r1)
    assert ids_of(next(it) for _ in range(2)) == full1[:100]
    (one,) = resume_on(local_ds, 1, [r0.state_dict(), r1.state_dict()], **kw)
    assert one.epoch == 0 and sorted(ids_of(one)) == sorted(full1[100:])  # only rank 1's tail was left
    with pytest.raises(ValueError, match=r"epochs 0 and 1 with rows yielded in both"):
        resume_on(local_ds, 1, [dict(r0.state_dict(), rows_emitted=10), r1.state_dict()], **kw)


def test_elastic_resume_refuses_incomplete_or_foreign_states(local_ds):
    kw = dict(batch_size=50, shuffle_buffer=150, seed=2)
    _, states = consume(local_ds, 3, [1, 1, 1], **kw)
    with pytest.raises(ValueError, match=r"every rank of one world: got ranks \[0, 2\]"):
        resume_on(local_ds, 2, [states[0], states[2]], **kw)
    with pytest.raises(ValueError, match=r"rank 0 has seed=2 but this reader has 5"):
        resume_on(local_ds, 2, states, **dict(kw, seed=5))
    with pytest.raises(ValueError, match=r"rank 1 has 7 units / 999 rows, but this dataset gives"):
        resume_on(local_ds, 2, [states[0], dict(states[1], num_units=7, num_rows=999), states[2]], **kw)
    rows1 = ParquetStreamReader(local_ds, world_size=3, rank=1, **kw).num_rows()
    with pytest.raises(ValueError, match=rf"old rank 1: rows_emitted=5000 outside \[0, {rows1}\]"):
        resume_on(local_ds, 2, [states[0], dict(states[1], rows_emitted=5000), states[2]], **kw)
    with pytest.raises(ValueError, match=r"needs the reader state of every old rank, got none"):
        resume_on(local_ds, 2, [], **kw)
