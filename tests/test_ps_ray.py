"""The PS on real Ray actors: admission, eviction, resharding, checkpoints, shard kill, placement."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from xdtrain.ps.local import LocalPS
from xdtrain.ps.optim import OptimizerSpec
from xdtrain.ps.server import InjectedFault
from xdtrain.ps.table import TableSpec

pytestmark = pytest.mark.ray
SGD1 = OptimizerSpec("sgd", lr=1.0)


@pytest.fixture(scope="module")
def ps(ray_cluster):
    from xdtrain.ps.client import PSClient

    client = PSClient(2)
    yield client
    client.close()


def _batches(n: int, seed: int, dim: int, id_range: int = 400, size: int = 96):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids = rng.integers(0, id_range, size)
        yield ids, torch.from_numpy(rng.standard_normal((size, dim)).astype(np.float32))


def _train(clients, table: str, n: int, seed: int) -> None:
    for ids, g in _batches(n, seed, clients[0].spec(table).dim):
        for c in clients:
            c.pull(table, ids)
            c.push(table, ids, g)


def test_admission_and_eviction_on_shards(ps):
    ps.create_table(TableSpec("adm", 2, min_count=2, optimizer=SGD1))
    ids = np.arange(40)
    assert not ps.pull("adm", ids).any()  # first sighting: the shared zero row
    ps.push("adm", ids, torch.ones(40, 2))  # dropped
    assert ps.num_rows("adm") == 0
    second = ps.pull("adm", ids)  # admitted on the second sighting, with their initial rows
    assert ps.num_rows("adm") == 40 and (second != 0).all()
    ps.push("adm", ids, torch.ones(40, 2))
    torch.testing.assert_close(ps.pull("adm", ids), second - 1.0, rtol=0, atol=1e-6)

    ps.create_table(TableSpec("ttl", 2, init="zeros", ttl_steps=1, optimizer=SGD1))
    ps.push("ttl", np.arange(10), torch.ones(10, 2))  # step 1
    ps.push("ttl", np.arange(5), torch.ones(5, 2))  # step 2
    ps.push("ttl", np.arange(3), torch.ones(3, 2))  # step 3: ids 5..9 last updated at step 1
    assert ps.evict("ttl") == 5
    assert ps.num_rows("ttl") == 5
    assert torch.equal(ps.pull("ttl", [0, 4, 9])[:, 0], torch.tensor([-3.0, -2.0, 0.0]))


def test_same_rows_as_in_process_backend_and_stats(ps):
    spec = TableSpec("same", 8, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.05))
    local = LocalPS(1)
    for c in (ps, local):
        c.create_table(spec)
    _train([ps, local], "same", 5, seed=1)
    ids = np.arange(400)
    assert torch.equal(ps.pull("same", ids), local.pull("same", ids))
    st = ps.stats()
    assert st["pull"]["rows"] > 0 and st["push"]["bytes"] > 0 and st["pull"]["p99_ms"] >= st["pull"]["p50_ms"]
    assert sum(s["same"]["rows"] for s in st["shards"]) == local.num_rows("same")
    assert all(s["same"]["rows"] > 0 and s["same"]["bytes"] > 0 for s in st["shards"])


def test_shards_request_the_ps_resource(ray_cluster, ps):
    assert ps._opts["resources"] == {"ps": 0.01}
    assert ray_cluster.available_resources()["ps"] <= 8 - 2 * 0.01 + 1e-9


def test_client_pickles_into_a_ray_task(ray_cluster, ps):
    ps.create_table(TableSpec("shared", 4))
    ids = np.arange(30)
    want = ps.pull("shared", ids)

    @ray_cluster.remote(num_cpus=0)
    def remote_pull(client, ids):
        client.push("shared", ids[:10], torch.ones(10, 4))
        return client.pull("shared", ids)

    got = ray_cluster.get(remote_pull.remote(ps, ids))
    assert torch.equal(got[10:], want[10:]) and not torch.equal(got[:10], want[:10])
    assert torch.equal(ps.pull("shared", ids), got)


def test_checkpoint_atomic_under_injected_shard_fault(ps, tmp_path):
    spec = TableSpec("ck", 4, optimizer=OptimizerSpec("adam", lr=0.02))
    ps.create_table(spec)
    _train([ps], "ck", 3, seed=2)
    url = str(tmp_path / "ck")
    ps.checkpoint(url)
    ids = np.arange(400)
    saved = ps.pull("ck", ids)
    _train([ps], "ck", 2, seed=3)
    ps.inject_fault(0, "checkpoint", after=3)
    with pytest.raises(InjectedFault):
        ps.checkpoint(url)
    local = LocalPS.from_checkpoint(url, num_shards=3)  # the previous checkpoint, on another shard count
    assert torch.equal(local.pull("ck", ids)[:, :], saved)


def test_shard_kill_mid_stream_recovers_checkpoint_plus_replay(ray_cluster, tmp_path):
    from xdtrain.ps.client import PSClient

    spec = TableSpec("kill", 16, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.1))
    ps, ref = PSClient(2, max_restarts=2), LocalPS(1)
    for c in (ps, ref):
        c.create_table(spec)
    url = str(tmp_path / "ck")
    batches = list(_batches(16, seed=4, dim=16, id_range=5000, size=2048))  # big enough for shared memory
    for i, (ids, g) in enumerate(batches):
        if i == 6:
            ps.checkpoint(url)
        if i == 10:  # some pushes since the checkpoint may still be in flight (pushes are async)
            os.kill(ps.shard_pids()[1], signal.SIGKILL)
        for c in (ps, ref):
            c.push("kill", ids, g)
    ids = np.arange(5000)
    got = ps.pull("kill", ids)  # the failed shard restarts, reloads the checkpoint, replays its pushes since
    assert torch.equal(got, ref.pull("kill", ids))
    events = ps.stats(shards=False)["events"]
    assert (
        events["shard_recovered"] == 1 and events["replayed_requests"] >= 4
    )  # the pushes logged since the checkpoint
    ps.close()


def test_live_reshard_grow_and_shrink(ray_cluster):
    from xdtrain.ps.client import PSClient

    spec = TableSpec("rs", 4, optimizer=OptimizerSpec("adagrad", lr=0.1), min_count=2)
    ps, ref = PSClient(2), LocalPS(1)
    for c in (ps, ref):
        c.create_table(spec)
    _train([ps, ref], "rs", 4, seed=5)
    ids = np.arange(400)
    moved = ps.reshard(3)
    assert sum(moved.values()) == 1365 and all(dst == 2 for _, dst in moved)
    assert torch.equal(ps.pull("rs", ids), ref.pull("rs", ids))
    _train([ps, ref], "rs", 2, seed=6)  # optimizer state and admission counters moved too
    ps.reshard(1)
    assert len(ps._handles) == 1
    assert torch.equal(ps.pull("rs", ids), ref.pull("rs", ids))
    assert ps.num_rows("rs") == ref.num_rows("rs")
    ps.close()


@pytest.mark.parametrize("staleness", [0, 1])
def test_prefetch_staleness_bound_with_async_pushes(ps, staleness):
    ps.staleness = staleness
    table = f"pf{staleness}"
    ps.create_table(TableSpec(table, 1, init="zeros", optimizer=SGD1))
    ids, issued = np.arange(64), 0
    ps.prefetch(table, ids)
    for step in range(8):
        for _ in range(step % 3):
            ps.push(table, ids, torch.ones(64, 1))
            issued += 1
        got = -ps.pull(table, ids)[:, 0]  # value = number of pushes the rows reflect
        assert (got >= issued - staleness).all() and (got <= issued).all()
        if staleness == 0:
            assert (got == issued).all()
        ps.prefetch(table, ids)  # the next batch's pull, overlapping the "compute"
    ps.pull(table, ids)
    ps.staleness = 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shared_memory_path_matches_in_process(ps, dtype):
    # batches of 4096 ids x 32 dims are large enough to go through the shared-memory buffers
    spec = TableSpec(f"shm_{dtype}", 32, dtype=dtype, optimizer=OptimizerSpec("adagrad", lr=0.05))
    local = LocalPS(1)
    for c in (ps, local):
        c.create_table(spec)
    for ids, g in _batches(6, seed=8, dim=32, id_range=20000, size=4096):  # with repeated ids
        assert torch.equal(ps.pull(spec.name, ids), local.pull(spec.name, ids))
        ps.push(spec.name, ids, g)
        local.push(spec.name, ids, g)
    ids = np.random.default_rng(9).permutation(20000)[:8192]  # distinct: rows land in place
    assert torch.equal(ps.pull(spec.name, ids), local.pull(spec.name, ids))
    grouped = ids[np.argsort(ps.slot_map.shard_of(ids), kind="stable")]  # each shard's ids one block
    req = ps._start_pull(spec.name, grouped)
    assert [c.args[5] for c in req.calls] == [0, int(len(req.groups[0][1]))]  # no positions: no scatter
    ps._discard(req)
    assert torch.equal(ps.pull(spec.name, grouped), local.pull(spec.name, grouped))
    assert ps._out_pool is not None and ps._pools
    held = [ps.pull(spec.name, ids) for _ in range(20)]  # more than the pool: falls back, still right
    assert all(torch.equal(h, held[0]) for h in held)
    del held
    for _ in range(5):
        ps.pull(spec.name, ids)
    assert sum(not b.busy for b in ps._out_pool._buffers) >= 1  # dropped outputs freed their buffers


def test_two_clients_each_replay_their_own_pushes(ray_cluster, tmp_path):
    import copy

    from xdtrain.ps.client import PSClient

    a = PSClient(2)
    a.create_table(TableSpec("two", 4, init="zeros", optimizer=SGD1))
    b = copy.copy(a)  # what a Ray Train worker gets: same shards, its own log and buffers
    ids = np.arange(3000)
    ones = torch.ones(3000, 4)
    url = str(tmp_path / "ck")
    for i in range(9):
        if i == 3:
            a.checkpoint(url)
            b.checkpoint_committed(url)
        if i == 6:
            os.kill(a.shard_pids()[0], signal.SIGKILL)
        a.push("two", ids, ones)
        b.push("two", ids[:1000], ones[:1000])
    a.flush()
    b.flush()
    # every push applied exactly once (-1 per push; integers, so the order cannot matter)
    want = torch.cat([torch.full((1000,), -18.0), torch.full((2000,), -9.0)])
    assert torch.equal(a.pull("two", ids)[:, 0], want)
    assert torch.equal(b.pull("two", ids)[:, 0], want)
    a.close()


def test_direct_channel_matches_ray_calls_and_maps_shard_errors(ray_cluster):
    import copy

    from xdtrain.ps.client import PSClient
    from xdtrain.ps.server import StaleSlotMap

    spec = TableSpec("chan", 32, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.1))
    a, ref = PSClient(2), LocalPS(1)
    for c in (a, ref):
        c.create_table(spec)
    b = copy.copy(a)
    b.direct_channel = False  # the same shards through plain Ray calls
    rng = np.random.default_rng(11)
    for size in (50, 4000, 50, 4000):  # small: arrays inline in the socket frames; large: shared memory
        for client in (a, b):
            ids = rng.integers(0, 9000, size)
            g = torch.from_numpy(rng.standard_normal((size, 32)).astype(np.float32))
            want = ref.pull("chan", ids)
            assert torch.equal(client.pull("chan", ids), want)
            client.push("chan", ids, g)
            ref.push("chan", ids, g)
            client.flush()
    ids = np.arange(9000)
    assert torch.equal(a.pull("chan", ids), ref.pull("chan", ids))
    assert torch.equal(b.pull("chan", ids), ref.pull("chan", ids))
    assert sorted(k for k, ch in a._channels.items() if ch is not None) == [0, 1]
    assert all(ch is None for ch in b._channels.values())
    stale = copy.copy(a)
    a.reshard(3)
    for client in (stale, b):  # an error raised on the shard arrives as its own class either way
        with pytest.raises(StaleSlotMap):
            client.pull("chan", ids[:10])
    assert torch.equal(a.pull("chan", ids), ref.pull("chan", ids))
    a.close()


def test_client_copies_in_other_processes_share_pushes_checkpoints_and_restores(ray_cluster, tmp_path):
    from xdtrain.ps.client import PSClient

    ps = PSClient(2)
    ps.create_table(TableSpec("cp", 16, init="zeros", optimizer=SGD1))
    ids = np.arange(3000)  # 3000 x 16 floats: the shared-memory + channel path

    @ray_cluster.remote(num_cpus=0)
    class Worker:  # e.g. a Ray Train worker holding its copy of the client
        def __init__(self, client):
            self.ps = client

        def push(self, ids, value: float, flush: bool) -> None:
            self.ps.push("cp", ids, torch.full((len(ids), 16), value))
            if flush:
                self.ps.flush()

        def pull(self, ids) -> np.ndarray:
            return self.ps.pull("cp", ids)[:, 0].numpy()

        def call(self, method: str, *args):
            return getattr(self.ps, method)(*args)

        def channels(self) -> list[int]:
            return sorted(k for k, ch in self.ps._channels.items() if ch is not None)

    w = Worker.remote(ps)
    get = ray_cluster.get
    get(w.push.remote(ids, 1.0, False))
    assert (get(w.pull.remote(ids)) == -1).all()  # its own unflushed push is visible to its next pull
    get(w.push.remote(ids[:1000], 1.0, True))  # flush: visible to every copy
    first = np.where(ids < 1000, -2.0, -1.0)
    assert np.array_equal(ps.pull("cp", ids)[:, 0].numpy(), first)
    assert get(w.channels.remote()) == [0, 1]  # the copy opened its own direct channels

    url = str(tmp_path / "ck")
    get(w.call.remote("checkpoint", url))
    ps.push("cp", ids, torch.full((3000, 16), 5.0))
    ps.flush()
    assert np.array_equal(get(w.pull.remote(ids)), first - 5.0)
    get(w.call.remote("restore", url))  # one copy restores: every copy reads the restored rows
    assert np.array_equal(ps.pull("cp", ids)[:, 0].numpy(), first)
    assert np.array_equal(get(w.pull.remote(ids)), first)
    ps.checkpoint_committed(url)  # the other copies forget their pushes from before the restore
    assert len(ps._log) == 0
    ps.push("cp", ids[:10], torch.ones(10, 16))
    ps.flush()
    assert np.array_equal(get(w.pull.remote(ids[:10])), first[:10] - 1.0)
    ps.close()


def test_routed_ids_pull_push_and_prefetch_match_plain_ids(ray_cluster):
    """Ids routed ahead of time (`route`): same rows and updates as plain ids, one block per shard,
    a prefetch of them is used by the pull, and after a reshard they still pull the right rows."""
    from xdtrain.ps.client import PSClient
    from xdtrain.ps.ids import RoutedIds

    spec = TableSpec("routed", 16, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.05))
    ps, ref = PSClient(2), LocalPS(3)
    for c in (ps, ref):
        c.create_table(spec)
    rng = np.random.default_rng(3)
    uniq = np.unique(rng.integers(0, 50_000, 6000))
    r = ps.route(uniq)
    assert isinstance(r, RoutedIds) and np.array_equal(r.ids, uniq[r.order])
    assert [k for k, _, _ in r.blocks] == [0, 1] and r.blocks[0][1] == 0 and r.blocks[-1][2] == len(uniq)
    for k, a, b in r.blocks:
        assert (ps.slot_map.shard_of(r.ids[a:b]) == k).all() and (np.diff(r.ids[a:b]) > 0).all()
    req = ps._start_pull("routed", r.ids, r.groups())
    assert [c.args[5] for c in req.calls] == [0, r.blocks[1][1]]  # each shard writes one block
    ps._discard(req)

    assert torch.equal(ps.pull("routed", r), ref.pull("routed", uniq)[r.order])
    g = torch.from_numpy(rng.standard_normal((len(uniq), 16)).astype(np.float32))
    ps.push("routed", r, g[r.order])  # grads in routed order
    ref.push("routed", uniq, g)
    assert torch.equal(ps.pull("routed", uniq), ref.pull("routed", uniq))

    ps.prefetch("routed", r)
    ps.push("routed", r, g[r.order])  # after the prefetch: staleness 0 re-pulls the touched rows
    ref.push("routed", uniq, g)
    before = ps.stats(shards=False)["events"].get("prefetch_rows_refreshed", 0)
    assert torch.equal(ps.pull("routed", r), ref.pull("routed", uniq)[r.order])
    assert ps.stats(shards=False)["events"]["prefetch_rows_refreshed"] - before == len(uniq)

    ps.reshard(3)  # r was routed under the old slot map: pulled as plain ids, still right
    assert torch.equal(ps.pull("routed", r), ref.pull("routed", uniq)[r.order])
    r3 = ps.route(uniq)
    assert len(r3.blocks) == 3 and torch.equal(ps.pull("routed", r3), ref.pull("routed", r3))  # ref: plain ids
    with pytest.raises(ValueError, match="ids repeat"):
        ps.route([5, 1, 5])
    ps.close()
