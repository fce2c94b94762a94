"""The PS storage, slots, admission, eviction, checkpoints, export and prefetch, in-process (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch

from xdtrain.ps.checkpoint import CheckpointError, read_manifest
from xdtrain.ps.export import read_export
from xdtrain.ps.ids import dedup
from xdtrain.ps.index import IdIndex
from xdtrain.ps.init import init_rows, table_key
from xdtrain.ps.local import LocalPS
from xdtrain.ps.optim import OptimizerSpec
from xdtrain.ps.server import InjectedFault
from xdtrain.ps.shm import SHM_DIR, reclaim_orphans, shm_available
from xdtrain.ps.slots import SlotMap, slot_of
from xdtrain.ps.table import ShardTable, TableSpec

SGD1 = OptimizerSpec("sgd", lr=1.0)


def test_initial_row_depends_only_on_seed_table_and_id():
    ids = np.array([7, -5, 2**62, 123], dtype=np.int64)
    a = init_rows("normal", 0.1, table_key(0, "t"), ids, 16, np.float32)
    b = init_rows("normal", 0.1, table_key(0, "t"), ids[::-1].copy(), 16, np.float32)[::-1]
    np.testing.assert_array_equal(a, b)  # not on batch order
    assert not np.array_equal(a, init_rows("normal", 0.1, table_key(1, "t"), ids, 16, np.float32))
    assert not np.array_equal(a, init_rows("normal", 0.1, table_key(0, "u"), ids, 16, np.float32))
    # not on which shard (or how many shards) admitted the id
    one, four = LocalPS(1), LocalPS(4)
    for ps in (one, four):
        ps.create_table(TableSpec("t", 16, init_scale=0.1))
    assert torch.equal(one.pull("t", ids), four.pull("t", ids))
    np.testing.assert_array_equal(one.pull("t", ids).numpy(), a)


def test_initializer_distributions():
    ids = np.arange(20000, dtype=np.int64)
    x = init_rows("normal", 0.5, 99, ids, 8, np.float32)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 0.5) < 0.01
    u = init_rows("uniform", 0.2, 99, ids, 3, np.float32)
    assert u.min() >= -0.2 and u.max() <= 0.2 and abs(u.std() - 0.2 / np.sqrt(3)) < 0.003
    assert not init_rows("zeros", 1.0, 99, ids[:5], 4, np.float32).any()


def test_id_index_exact_and_rebuilt():
    idx = IdIndex()
    keys = np.array([2**63 - 1, -(2**63), 0, 17, -17], dtype=np.int64)
    idx.insert(keys, np.arange(5) + 10)
    np.testing.assert_array_equal(idx.lookup(np.array([17, 3, -(2**63)])), [13, -1, 11])
    idx.reset(keys[::-1].copy())
    np.testing.assert_array_equal(idx.lookup(keys), [4, 3, 2, 1, 0])


def test_dedup_keeps_first_seen_order():
    u, inv = dedup(np.array([5, 3, 5, 9, 3]))
    np.testing.assert_array_equal(u, [5, 3, 9])
    np.testing.assert_array_equal(u[inv], [5, 3, 5, 9, 3])
    u, inv = dedup(np.array([4, 1, 2]))
    assert inv is None and list(u) == [4, 1, 2]


def test_slots_rebalance_moves_only_whole_slots():
    ids = np.arange(100000, dtype=np.int64)
    counts = np.bincount(slot_of(ids, 64), minlength=64)
    assert counts.min() > 0.8 * counts.mean()  # hashing spreads ids over slots
    m2 = SlotMap.even(64, 2)
    m3 = m2.rebalance(3)
    assert sorted(np.bincount(m3.slot_to_shard)) == [21, 21, 22]
    moved = sum(len(v) for v in m2.moves(m3).values())
    assert moved == 21  # the minimum: the new shard's share, nothing shuffled between old shards
    assert all(dst == 2 for (_, dst) in m2.moves(m3))
    m1 = m3.rebalance(1)
    assert (m1.slot_to_shard == 0).all() and m1.version == m3.version + 1


def test_pull_dedups_and_push_sums_repeated_ids():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 2, init="zeros", optimizer=SGD1))
    ps.push("t", [4, 9, 4], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    out = ps.pull("t", torch.tensor([[4, 9], [9, 4]]))
    assert torch.equal(out, torch.tensor([[-3.0, -2.0], [0.0, -1.0], [0.0, -1.0], [-3.0, -2.0]]))
    assert ps.num_rows("t") == 2
    assert ps.pull("t", []).shape == (0, 2)


def test_bad_inputs_name_the_problem():
    ps = LocalPS()
    with pytest.raises(ValueError, match="dim must be >= 1"):
        TableSpec("t", 0)
    with pytest.raises(ValueError, match="optimizer.name"):
        OptimizerSpec("lamb")
    ps.create_table(TableSpec("t", 3))
    with pytest.raises(KeyError, match="no PS table 'u'"):
        ps.pull("u", [1])
    with pytest.raises(TypeError, match="hash_ids"):
        ps.pull("t", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="width 2, the table has dim 3"):
        ps.push("t", [1, 2], torch.ones(2, 2))
    with pytest.raises(ValueError, match="different spec"):
        ps.create_table(TableSpec("t", 4))


def test_admission_threshold():
    t = ShardTable(TableSpec("t", 2, init="normal", min_count=3, optimizer=SGD1))
    ids = np.array([1, 2], dtype=np.int64)
    for _ in range(2):  # seen twice: still the shared zero row, pushes dropped
        assert not t.pull(ids).any()
        assert t.push(ids, np.ones((2, 2), np.float32)) == 0
    assert t.n == 0
    first = t.pull(np.array([1, 5], dtype=np.int64))  # third sighting of 1 admits it; 5 is new
    assert first[0].any() and not first[1].any() and t.n == 1
    assert t.push(np.array([1, 5], dtype=np.int64), np.ones((2, 2), np.float32)) == 1
    np.testing.assert_allclose(t.pull(np.array([1], dtype=np.int64))[0], first[0] - 1.0)


def test_ttl_eviction_by_last_update_step():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 2, init="zeros", ttl_steps=2, optimizer=SGD1))
    g = torch.ones(1, 2)
    ps.push("t", [10], g)  # step 1
    ps.push("t", [20], g)  # step 2
    ps.push("t", [30], g)  # step 3
    ps.push("t", [30], g)  # step 4: row 10 (last update 1) is now more than 2 steps old
    assert ps.evict("t") == 1 and ps.num_rows("t") == 2
    assert torch.equal(ps.pull("t", [20, 30]), torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]))
    assert torch.equal(ps.pull("t", [10]), torch.zeros(1, 2))  # re-admitted fresh
    ps.create_table(TableSpec("keep", 2))
    ps.pull("keep", [1])
    assert ps.evict("keep") == 0  # off by default


def _fill(ps, steps: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = ps.spec("t").dim
    for _ in range(steps):
        ids = rng.integers(0, 500, 64)
        ps.pull("t", ids)
        ps.push("t", ids, torch.from_numpy(rng.standard_normal((64, dim)).astype(np.float32)))
    return np.arange(500)


@pytest.mark.parametrize("shards_before,shards_after", [(2, 2), (2, 3), (3, 1)])
def test_checkpoint_restores_bit_identical_on_any_shard_count(tmp_path, shards_before, shards_after):
    spec = TableSpec("t", 4, optimizer=OptimizerSpec("adam", lr=0.05), min_count=2, ttl_steps=50)
    ps = LocalPS(shards_before)
    ps.create_table(spec)
    ids = _fill(ps)
    url = f"file://{tmp_path}/ck"
    ps.checkpoint(url)
    back = LocalPS.from_checkpoint(url, num_shards=shards_after)
    assert back.tables() == ["t"] and back.spec("t") == spec
    assert back.num_rows("t") == ps.num_rows("t")
    assert torch.equal(back.pull("t", ids), ps.pull("t", ids))
    # optimizer state and steps came back too: the same pushes give the same rows
    for p in (ps, back):
        _fill(p, steps=2, seed=7)
    assert torch.equal(back.pull("t", ids), ps.pull("t", ids))


def test_checkpoint_on_memory_fs_and_missing_manifest():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 4))
    ids = _fill(ps, steps=2)
    ps.checkpoint("memory://ps-ck")
    assert torch.equal(LocalPS.from_checkpoint("memory://ps-ck", 1).pull("t", ids), ps.pull("t", ids))
    with pytest.raises(CheckpointError, match="no checkpoint manifest"):
        read_manifest("memory://nowhere")


def test_crash_mid_checkpoint_leaves_previous_loadable(tmp_path):
    url = str(tmp_path / "ck")
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 4, optimizer=OptimizerSpec("adagrad", lr=0.1)))
    ids = _fill(ps)
    ps.checkpoint(url)
    before = ps.pull("t", ids)
    _fill(ps, steps=2, seed=3)
    ps.inject_fault(1, "checkpoint", after=2)  # shard 1 dies after writing 2 of its files
    with pytest.raises(InjectedFault):
        ps.checkpoint(url)
    assert len(list((tmp_path / "ck").glob("data-*"))) == 2  # the partial attempt is there ...
    assert torch.equal(LocalPS.from_checkpoint(url, 2).pull("t", ids), before)  # ... and ignored
    ps.checkpoint(url)  # the next good checkpoint commits and cleans up
    assert len(list((tmp_path / "ck").glob("data-*"))) == 1
    assert torch.equal(LocalPS.from_checkpoint(url, 3).pull("t", ids), ps.pull("t", ids))


def test_truncated_checkpoint_file_is_reported(tmp_path):
    ps = LocalPS(1)
    ps.create_table(TableSpec("t", 4))
    _fill(ps, steps=1)
    ps.checkpoint(str(tmp_path))
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    rows = tmp_path / manifest["shards"][0]["dir"] / "t" / "rows.npy"
    rows.write_bytes(rows.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="rows.npy: missing or of the wrong size"):
        LocalPS.from_checkpoint(str(tmp_path))


def test_reshard_in_process_keeps_rows_and_state():
    ps = LocalPS(2)
    ps.create_table(TableSpec("t", 4, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.1)))
    ref = LocalPS(1)
    ref.create_table(ps.spec("t"))
    ids = _fill(ps)
    _fill(ref)
    moved = ps.reshard(4)
    assert sum(moved.values()) == 2048  # 4096 slots: half of them move to the two new shards
    rows = [info["t"]["rows"] for info in ps.shard_info()]
    assert len(rows) == 4 and min(rows) > 0 and sum(rows) == ref.num_rows("t")
    for p in (ps, ref):
        _fill(p, steps=2, seed=9)
    assert torch.equal(ps.pull("t", ids), ref.pull("t", ids))


def test_export_parquet(tmp_path):
    ps = LocalPS(3)
    ps.create_table(TableSpec("t", 5))
    ids = _fill(ps, steps=2)
    url = f"file://{tmp_path}/exp"
    ps.export("t", url, rows_per_file=50)
    table = read_export(url)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 5)
    assert table.num_rows == ps.num_rows("t")
    got = dict(zip(table["id"].to_pylist(), np.asarray(table["vector"].to_pylist(), dtype=np.float32)))
    seen = np.array(sorted(got))
    np.testing.assert_array_equal(np.stack([got[i] for i in seen]), ps.pull("t", seen).numpy())
    assert set(seen) <= set(ids)
    assert not list((tmp_path / "exp").glob(".*tmp*"))
    with pytest.raises(FileExistsError):
        ps.export("t", url)
    fs = fsspec.filesystem("file")
    assert len(fs.glob(f"{tmp_path}/exp/*.parquet")) >= 3


@pytest.mark.parametrize("staleness", [0, 2])
def test_prefetch_respects_staleness_bound(staleness):
    ps = LocalPS(2, staleness=staleness)
    ps.create_table(TableSpec("t", 1, init="zeros", optimizer=SGD1))
    ids = np.arange(8)
    issued = 0
    for step in range(10):
        ps.prefetch("t", ids)  # issued now; `step` pushes come before it is consumed
        for _ in range(step % 4):
            ps.push("t", ids, torch.ones(8, 1))
            issued += 1
        got = -ps.pull("t", ids)[:, 0]  # each push subtracts 1: the value counts applied pushes
        assert (got >= issued - staleness).all() and (got <= issued).all()
        if staleness == 0:
            assert (got == issued).all()
    assert ps.stats(shards=False)["events"].get("prefetch_rows_refreshed", 0) > 0


def test_memory_per_row_near_the_floor():
    t = ShardTable(TableSpec("t", 64, optimizer=OptimizerSpec("rowwise_adagrad")))
    n = 1 << 16
    t.pull(np.arange(n, dtype=np.int64) * 7919)
    floor = t.spec.bytes_floor_per_row()
    assert floor == 64 * 4 + 4 + 8
    assert t.nbytes() / n < 1.25 * floor  # arrays at exact capacity + the hash index


def test_replay_log_copies_overflows_and_reuses_its_blocks():
    from xdtrain.ps.replay import ReplayLog

    log = ReplayLog(max_bytes=70 << 20)
    ids, g = np.arange(4, dtype=np.int64), np.ones((4, 2), np.float32)
    assert log.add_push("t", 1, ids, g)
    g[:] = 5  # the caller reuses its buffer: the log kept a copy
    log.add_evict("t", 2)
    kinds = [(e[0], e[2]) for e in log]
    assert kinds == [("push", 1), ("evict", 2)] and next(iter(log))[4].sum() == 8
    blocks = log.nbytes
    log.truncate()
    assert len(log) == 0 and log.nbytes == blocks  # kept for reuse
    big = np.zeros((20 << 20) // 4, np.float32)
    assert (
        log.add_push("t", 3, ids, big) and log.add_push("t", 4, ids, big) and log.add_push("t", 5, ids, big)
    )
    assert not log.add_push("t", 6, ids, big)  # past 70 MB: dropped, memory freed
    assert log.overflowed and len(log) == 0 and log.nbytes == 0
    log.truncate()
    assert not log.overflowed and log.add_push("t", 7, ids, g)


@pytest.mark.parametrize("space", [1000, 50_000, 400_000, 2**62])
def test_id_index_direct_range_and_hash_agree_with_a_dict(space):
    # compact ids use the direct-mapped range, others the hash table; ids move between them on growth
    rng = np.random.default_rng(space % 97)
    idx, keys, ref = IdIndex(), np.empty(0, np.int64), {}
    for _ in range(12):
        new = np.setdiff1d(rng.integers(-3, space, int(rng.integers(1, 4000))), keys)
        new = rng.permutation(new)
        pos = np.arange(len(keys), len(keys) + len(new))
        keys = np.concatenate([keys, new])
        idx.insert(new, pos, keys=keys)
        ref.update(zip(new.tolist(), pos.tolist()))
        probe = np.concatenate([rng.integers(-5, space, 300), keys[rng.integers(0, len(keys), 300)]])
        np.testing.assert_array_equal(idx.lookup(probe), [ref.get(int(x), -1) for x in probe])
    assert len(idx) == len(keys)
    if space <= 50_000:  # compact: only the negative ids in the hash table, 4 bytes per direct entry
        assert idx._ht_n == (keys < 0).sum() and idx._dense.nbytes <= 4 * (space + 4096)
    else:  # sparse: the direct range stays within 8 entries per id
        assert 0 < idx._ht_n and len(idx._dense) <= max(65536, 8 * len(keys))
    idx.reset(keys[::-1].copy())
    np.testing.assert_array_equal(idx.lookup(keys), np.arange(len(keys))[::-1])


def test_sorted_unique_ids_skip_dedup_and_pull_the_same_rows():
    ids = np.array([-4, 0, 3, 9, 2**40], dtype=np.int64)
    u, inv = dedup(ids)
    assert u is ids and inv is None  # strictly increasing: no sort, no copy
    u, inv = dedup(np.array([1, 3, 3, 7]))  # sorted but repeated: still deduplicated
    np.testing.assert_array_equal(u, [1, 3, 7])
    np.testing.assert_array_equal(u[inv], [1, 3, 3, 7])
    rng = np.random.default_rng(5)
    for ids in (rng.permutation(10_000) - 5000, rng.permutation(10_000) + 2**40):  # int32-sized or not
        assert dedup(ids)[1] is None
        rep = np.concatenate([ids, ids[:1]])
        u, inv = dedup(rep)
        assert len(u) == len(ids) and np.array_equal(u[inv], rep)
    ps = LocalPS(3)
    ps.create_table(TableSpec("t", 4))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(5000) - 100
    by_id = dict(zip(shuffled.tolist(), ps.pull("t", shuffled).numpy()))
    srt = np.unique(rng.integers(-100, 4900, 3000))
    np.testing.assert_array_equal(ps.pull("t", srt).numpy(), np.stack([by_id[i] for i in srt.tolist()]))


def test_split_matches_per_shard_masks_and_slot_hash():
    from xdtrain.ps.init import mix64
    from xdtrain.ps.slots import _SLOT_SALT

    ids = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, 20000)
    for num_slots in (4096, 1000):
        want = (mix64(ids.view(np.uint64) ^ _SLOT_SALT) % np.uint64(num_slots)).astype(np.int64)
        np.testing.assert_array_equal(slot_of(ids, num_slots), want)
    m = SlotMap.even(4096, 5)
    shard = m.shard_of(ids)
    groups = m.split(ids)
    assert [k for k, _ in groups] == [0, 1, 2, 3, 4]
    for k, sel in groups:
        np.testing.assert_array_equal(sel, np.flatnonzero(shard == k))


@pytest.mark.parametrize("dtype,min_count", [("float32", 1), ("float16", 1), ("float32", 10)])
def test_pull_into_places_rows_like_pull(dtype, min_count):
    t = ShardTable(TableSpec("t", 8, dtype=dtype, min_count=min_count))
    ids = np.random.default_rng(2).permutation(3000).astype(np.int64)
    for _ in range(min_count):  # min_count 10: ids[:2000] admitted, the rest read the zero row
        t.pull(ids[:2000])
    want = t.pull(ids.copy()).astype(np.float32)
    assert (want[:2000] != 0).all() and (min_count == 1) == (want[2000:] != 0).all()
    out = np.full((4000, 8), 7.0, np.float32)
    where = np.random.default_rng(3).permutation(4000)[:3000]
    t._scratch = np.empty((256, 8), t.rows.dtype)  # force several chunks
    t.pull_into(ids, 0, out, where)
    np.testing.assert_array_equal(out[where], want)
    untouched = np.setdiff1d(np.arange(4000), where)
    assert (out[untouched] == 7.0).all()
    out2 = np.zeros((3000, 8), np.float32)
    t.pull_into(ids, 0, out2)
    np.testing.assert_array_equal(out2, want)


def test_channel_needs_the_token_keeps_order_and_returns_errors_by_class():
    from xdtrain.ps.channel import Channel, ChannelClosed, ChannelServer, RemoteError

    def handler(method, incarnation, version, args):
        if method == "push":
            raise ValueError(f"bad grads from {incarnation} v{version}")
        if method == "pull_shm":
            raise OSError("boom")
        return args[0] * 2

    server = ChannelServer(handler, frozenset({"pull", "push", "pull_shm"}))
    chan = Channel(server.address, server.token, {"ValueError": ValueError})
    big = [np.full((256, 256), i, np.float32) for i in range(40)]  # 10 MB each way: more than the socket
    tickets = [chan.submit("pull", None, None, (a,)) for a in big]  # holds, none read yet
    errs = [chan.submit(m, "inc", 3, (1,)) for m in ("push", "pull_shm", "evict")]
    for i, t in enumerate(tickets):
        np.testing.assert_array_equal(t.result(), big[i] * 2)  # responses in request order
    with pytest.raises(ValueError, match="bad grads from inc v3"):
        errs[0].result()
    with pytest.raises(RemoteError, match="OSError: boom"):
        errs[1].result()
    with pytest.raises(RemoteError, match="not served over the channel"):
        errs[2].result()
    intruder = Channel(server.address, "0" * 32, {})
    with pytest.raises(ChannelClosed):
        intruder.submit("pull", None, None, (np.arange(3),)).result()
    assert intruder.closed and not chan.closed
    chan.close()
    with pytest.raises(ChannelClosed):
        chan.submit("pull", None, None, (np.arange(3),)).result()



def test_channel_drops_a_silent_connection_and_one_from_another_user(monkeypatch):
    import socket

    from xdtrain.ps import channel

    monkeypatch.setattr(channel, "HELLO_TIMEOUT_S", 0.3)
    server = channel.ChannelServer(lambda *a: 0, frozenset({"pull"}))
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(server.address)
    silent.settimeout(10)  # the deadline for the server to hang up: far above its 0.3 s
    assert silent.recv(1) == b""  # closed by the server, not timed out here
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    # a process that holds the right token is served only when it runs as the same user
    probe = ("import os, sys, numpy as np; from xdtrain.ps.channel import Channel, ChannelClosed; "
             "os.setuid(int(sys.argv[3])); c = Channel(chr(0) + sys.argv[1], sys.argv[2], {}); "
             "t = c.submit('pull', None, None, (np.arange(3),))\n"
             "try: print(t.result())\nexcept ChannelClosed: print('closed')")
    repo = os.path.dirname(os.path.dirname(__file__))
    runs = {uid: subprocess.run([sys.executable, "-c", probe, server.address[1:], server.token, str(uid)],
                                capture_output=True, text=True, timeout=120, cwd=repo)
            for uid in (os.getuid(), 65534)}
    assert runs[os.getuid()].stdout.strip() == "0", runs[os.getuid()].stderr  # the handler's answer
    assert runs[65534].stdout.strip() == "closed", runs[65534].stderr


def test_repeated_ids_are_grouped_by_shard_and_read_the_same_rows():
    ids = np.random.default_rng(6).integers(-50, 3000, 5000)  # many repeats
    one, three = LocalPS(1), LocalPS(3)
    for ps in (one, three):
        ps.create_table(TableSpec("t", 4))
    req = three._start_pull("t", ids)  # distinct ids reordered so each shard's form one block
    blocks = np.concatenate([sel for _, sel in req.groups])
    np.testing.assert_array_equal(blocks, np.arange(len(req.uniq)))  # shard after shard, in one piece each
    np.testing.assert_array_equal(req.uniq[req.inverse], ids)
    three._discard(req)
    assert torch.equal(three.pull("t", ids), one.pull("t", ids))


def test_route_orders_distinct_ids_by_shard_and_pull_rows_puts_them_back():
    from xdtrain.nn.sparse import pull_rows

    ps = LocalPS(3)
    ps.create_table(TableSpec("r", 4))
    ids = np.array([[7, 3, 99], [3, 1000, 42]])
    plain = ps.pull("r", np.unique(ids))
    r = ps.route(np.unique(ids))
    assert sorted(r.ids.tolist()) == [3, 7, 42, 99, 1000] and r.order is not None
    assert torch.equal(ps.pull("r", r), plain[r.order])
    assert ps.route(np.unique(ids)) is r  # recent routes are found again, not recomputed
    ps.reshard(2)
    assert ps.route(np.unique(ids)) is not r and torch.equal(ps.pull("r", r), plain[r.order])
    rows = pull_rows(ps, {"r": torch.from_numpy(ids)})["r"]
    assert torch.equal(rows.weight.detach(), plain)  # back in sorted-id order for Rows
    assert torch.equal(rows(torch.tensor([1000, 7])), plain[[4, 1]])
    one = LocalPS(1)
    one.create_table(TableSpec("r", 4))
    assert one.route([9, 2, 5]).order is None  # one shard: nothing to reorder


# ---------------------------------------------------------------- shared-memory leftovers


def test_orphaned_shared_memory_is_reclaimed_at_start_up():
    if not shm_available():
        pytest.skip(f"no writable {SHM_DIR}")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that ran and is gone
    live = subprocess.Popen(["sleep", "120"])
    paths = {who: f"{SHM_DIR}/xdps-{p.pid}-0a1b2c3d-1" for who, p in (("dead", dead), ("live", live))}
    other = f"{SHM_DIR}/xdps-notapid-{os.getpid()}"  # not a buffer name: never touched
    try:
        for p in (*paths.values(), other):
            with open(p, "wb") as f:
                f.write(b"\0" * 4096)
        # A new process's first pool (every PS client's start-up) reclaims the dead one's buffer.
        code = "from xdtrain.ps.shm import ShmPool; ShmPool()"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert not os.path.exists(paths["dead"])
        assert os.path.exists(paths["live"]) and os.path.exists(other)
        live.kill()
        live.wait()
        assert paths["live"] in reclaim_orphans()  # gone once its owner is
    finally:
        live.kill()
        for p in (*paths.values(), other):
            if os.path.exists(p):
                os.unlink(p)
