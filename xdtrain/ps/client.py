"""`PSClient`: the PS over sharded Ray actors, with automatic recovery of failed shards.

Transport: data calls (pull, push) to shards on the client's own node skip Ray's task path: they
go over a direct socket to the actor process (`channel.py`, ~0.05 ms against ~1.5-2 ms for a Ray
call here), with ids, gradients and rows in shared-memory buffers (`shm.py`) that the shards read
and write in place (pulled rows land straight in the output). Control calls (checkpoints,
resharding, recovery) stay Ray calls; before one, the client waits for its outstanding socket
requests to that shard, so a shard sees each client's calls in the order they were issued.
Shards on other nodes get plain Ray calls with numpy arguments (Ray's object store).
A client is not thread-safe: use one per thread or process (it pickles into Ray tasks/workers).

Guarantee on a shard failure (process killed, node lost): Ray restarts the actor (up to
`max_restarts`); the first call that fails makes this client reset the shard to the last
checkpoint this client wrote, restored or was told of (or to empty tables if none), replay
every push and eviction this client issued since then for that shard's slots, in their
original order, and re-send the failed pulls. With one client per set of tables the table
afterwards is bit-identical to a run without the failure. With several clients on one shard
(clients other than the checkpoint writer must call `checkpoint_committed(url)` when a
checkpoint commits) the shard is reset once, by the first client to see the failure; the
others get `ShardRestarted` and only replay their own logs. Every push is then applied
exactly once, but pushes of different clients may be re-applied in another order: equal for
SGD up to float rounding, not bit-identical for the adaptive optimizers.
Not recovered: admission counters and TTL steps gained by pulls since the checkpoint (a row
admitted by a pull is re-admitted with the same initial value on its next pull or push).
The replay log holds the pushed gradients; past `replay_log_bytes` it is dropped (a warning,
and `stats()['events']['replay_log_overflow']`) and a recovery restores the checkpoint only.
"""

from __future__ import annotations

import time
import warnings
import weakref

import numpy as np
import ray
from ray.exceptions import RayActorError

from xdtrain.ps.channel import Channel, ChannelClosed, Ticket
from xdtrain.ps.metrics import PSStats, RayMetrics
from xdtrain.ps.replay import ReplayLog
from xdtrain.ps.router import Call, Router, contiguous
from xdtrain.ps.server import InjectedFault, StaleSlotMap
from xdtrain.ps.shard import CHANNEL_METHODS, ROUTED_METHODS, EmbeddingShard, ShardNeedsRecovery, ShardRestarted
from xdtrain.ps.shm import MIN_SHM_BYTES, ShmPool, align, shm_available
from xdtrain.ps.slots import DEFAULT_NUM_SLOTS, SlotMap

_FAILURES = (RayActorError, ShardNeedsRecovery, ShardRestarted, ChannelClosed)
# errors a shard may return over the channel, re-raised as these classes (others: RemoteError)
_CHANNEL_ERRORS = {
    c.__name__: c
    for c in (ShardNeedsRecovery, ShardRestarted, StaleSlotMap, InjectedFault)
    + (KeyError, ValueError, TypeError)
}
_MAX_INFLIGHT_PER_SHARD = 4


def _free(buf) -> None:
    buf.busy = False


class PSError(RuntimeError):
    """The PS cannot serve a request (a shard is gone for good, or recovery failed)."""


class PSClient(Router):
    """Sharded embedding tables in Ray actors; see the module docstring for the failure contract."""

    def __init__(
        self,
        num_shards: int = 2,
        *,
        name: str = "ps",
        num_slots: int = DEFAULT_NUM_SLOTS,
        staleness: int = 0,
        resource: str | None = "ps",
        resource_per_shard: float = 0.01,
        num_cpus: float = 0.0,
        max_restarts: int = 3,
        replay_log_bytes: int = 512 << 20,
        recovery_timeout_s: float = 120.0,
        shared_memory: bool = True,
        direct_channel: bool = True,
    ) -> None:
        if not ray.is_initialized():
            ray.init()
        super().__init__(SlotMap.even(num_slots, num_shards), staleness)
        self.name = name
        self._opts = {"max_restarts": int(max_restarts), "max_task_retries": 0, "num_cpus": float(num_cpus)}
        if resource and ray.cluster_resources().get(resource, 0) > 0:
            self._opts["resources"] = {resource: float(resource_per_shard)}
        self.replay_log_bytes = int(replay_log_bytes)
        self.recovery_timeout_s = float(recovery_timeout_s)
        self.shared_memory = bool(shared_memory)
        self.direct_channel = bool(direct_channel)
        self._handles: list = []
        self._nodes: list[str] = []
        self._incarnations: list[str] = []
        self._epochs: list[int] = []
        self._recovery: tuple[str | None, dict | None, dict | None] = (None, None, None)  # url, manifest, plan
        self._init_process_state()
        self._add_shards(list(range(num_shards)), self.slot_map)

    def _init_process_state(self) -> None:
        self._log = ReplayLog(self.replay_log_bytes)
        self._ray_metrics: RayMetrics | None = None
        here = ray.get_runtime_context().get_node_id()
        use = self.shared_memory and shm_available()
        self._pools: dict[int, ShmPool] = {}
        self._out_pool: ShmPool | None = None
        self._local_shard = [use and node == here for node in self._nodes]
        self._channels: dict[int, Channel | None] = {}  # per process: sockets are not shared

    @classmethod
    def from_checkpoint(cls, url: str, num_shards: int = 2, **kwargs) -> PSClient:
        """A new PS with `num_shards` shards holding the checkpoint at `url`."""
        from xdtrain.ps.checkpoint import read_manifest

        client = cls(num_shards, num_slots=read_manifest(url)["num_slots"], **kwargs)
        client.restore(url)
        return client

    # ---- pickling: hand the client to Ray Train workers -------------------------------------
    def __getstate__(self) -> dict:
        self.flush()
        keep = ("slot_map", "staleness", "_specs", "_step", "_lr_scale", "name", "_opts", "replay_log_bytes")
        keep += ("recovery_timeout_s", "_handles", "_incarnations", "_epochs", "_recovery")
        keep += ("shared_memory", "direct_channel", "_nodes")
        state = {k: self.__dict__[k] for k in keep}
        # copies, so that a copy.copy() in this process does not share the per-shard bookkeeping
        return {k: (type(v)(v) if isinstance(v, list | dict) else v) for k, v in state.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.metrics = PSStats()
        self._reset_local_state()
        self._init_process_state()

    # ---- shard lifecycle ----------------------------------------------------------------------
    def _add_shards(self, indices: list[int], slot_map: SlotMap) -> None:
        new = [EmbeddingShard.options(**self._opts).remote(k, slot_map.to_dict()) for k in indices]
        hellos = ray.get([h.hello.remote() for h in new])
        self._handles += new
        self._incarnations += [h["incarnation"] for h in hellos]
        self._epochs += [0] * len(new)
        self._nodes += [h["node_id"] for h in hellos]
        here = ray.get_runtime_context().get_node_id()
        use = self.shared_memory and shm_available()
        self._local_shard += [use and h["node_id"] == here for h in hellos]

    def _close_shards(self, indices: list[int]) -> None:
        for k in sorted(indices, reverse=True):
            assert k == len(self._handles) - 1
            ray.kill(self._handles.pop(), no_restart=True)
            self._drop_channel(k)
            for lst in (self._incarnations, self._epochs, self._nodes, self._local_shard):
                lst.pop()
            pool = self._pools.pop(k, None)
            if pool is not None:
                pool.close()

    def close(self) -> None:
        """Stop all shard actors (their tables are lost unless checkpointed)."""
        self._inflight = []
        for k in list(self._channels):
            self._drop_channel(k)
        for h in self._handles:
            ray.kill(h, no_restart=True)
        self._handles, self._incarnations, self._epochs, self._nodes, self._local_shard = [], [], [], [], []
        for pool in [*self._pools.values(), self._out_pool]:
            if pool is not None:
                pool.close()
        self._pools, self._out_pool = {}, None

    def shard_pids(self) -> list[int]:
        """Process id of each shard actor (for fault-injection tests and debugging)."""
        return [h["pid"] for h in ray.get([h.hello.remote() for h in self._handles])]

    def inject_fault(self, shard: int, point: str, after: int = 0) -> None:
        """Arm a fault in one shard (tests of crash safety); see ShardServer.inject_fault."""
        self._wait([self._call(shard, "inject_fault", point, after)])

    # ---- transport ------------------------------------------------------------------------------
    def _submit(self, call: Call) -> None:
        k = call.shard
        data = call.method in CHANNEL_METHODS
        version = self.slot_map.version if call.method in ROUTED_METHODS else None
        call.epoch = self._epochs[k]
        chan = self._channel(k) if data and self._local_shard[k] else self._channels.get(k)
        if data and chan is not None:
            call.handle = chan.submit(call.method, self._incarnations[k], version, call.args)
            return
        if chan is not None:  # a Ray call to shard k runs after every socket request sent before it
            chan.drain()
        call.handle = self._handles[k].call.remote(self._incarnations[k], version, call.method, *call.args)

    def _channel(self, k: int) -> Channel | None:
        """The open socket to local shard k (opened on first use); None: use Ray calls."""
        chan = self._channels.get(k, False)
        if chan is None or (chan and not chan.closed):
            return chan
        if not self.direct_channel:
            self._channels[k] = None
            return None
        try:
            info = ray.get(self._handles[k].open_channel.remote())
        except RayActorError:
            return None  # the shard is down: this call goes through Ray and fails into recovery
        try:
            chan = Channel(info["address"], info["token"], _CHANNEL_ERRORS) if info else None
        except OSError as e:  # e.g. another network namespace: Ray calls work everywhere
            warnings.warn(f"PS shard {k}: no direct channel ({e}); using Ray calls", stacklevel=4)
            chan = None
        self._channels[k] = chan
        return chan

    def _drop_channel(self, k: int) -> None:
        chan = self._channels.pop(k, None)
        if chan is not None:
            chan.close()

    def _buffer(self, k: int, nbytes: int, min_bytes: int = MIN_SHM_BYTES):
        if not self._local_shard[k] or nbytes < min_bytes:
            return None
        pool = self._pools.get(k)
        if pool is None:
            pool = self._pools[k] = ShmPool()
        return pool.acquire(nbytes)

    def _pull_output(self, table: str, n: int, groups: list):
        dim = self._specs[table].dim
        if n * dim * 4 < MIN_SHM_BYTES or not all(self._local_shard[k] for k, _ in groups):
            return None
        if self._out_pool is None:
            self._out_pool = ShmPool()
        buf = self._out_pool.acquire(n * dim * 4)
        if buf is None:  # every output buffer is still held by a caller's tensor
            return None
        out = buf.view(0, np.float32, (n, dim))
        weakref.finalize(out, _free, buf)  # the buffer is reused once the caller drops the rows
        return out, buf

    def _pull_call(
        self, k: int, table: str, uniq: np.ndarray, sel: np.ndarray | None, step: int, out=None
    ) -> Call:
        spec = self._specs[table]
        n = len(uniq) if sel is None else len(sel)
        off = align(8 * n)
        if out is not None:  # ids (and their output positions) in; rows straight to their places
            block = contiguous(sel)  # one block of the output: no positions, no scatter on the shard
            buf = self._buffer(k, off + (0 if block else 8 * n), min_bytes=0)  # the output is shared already
            if buf is not None:
                ids = buf.view(0, np.int64, (n,))
                start = 0 if sel is None else int(sel[0]) if block else -1
                if sel is None:
                    ids[:] = uniq
                elif block:
                    ids[:] = uniq[start : start + n]
                else:
                    np.take(uniq, sel, out=ids, mode="clip")  # "raise" would buffer `out`
                    buf.view(off, np.int64, (n,))[:] = sel
                args = (table, buf.path, buf.size, n, off, start, out.path, out.size, step)
                return Call(k, "pull_into", args, buffer=buf, direct=True)
        dtype = np.dtype(spec.dtype)
        buf = self._buffer(k, off + n * spec.dim * dtype.itemsize)
        if buf is None:
            return super()._pull_call(k, table, uniq, sel, step)
        ids = buf.view(0, np.int64, (n,))
        if sel is None:
            ids[:] = uniq
        else:
            np.take(uniq, sel, out=ids, mode="clip")
        call = Call(k, "pull_shm", (table, buf.path, buf.size, n, off, step), buffer=buf)
        call.out = buf.view(off, dtype, (n, spec.dim))
        return call

    def _push_call(
        self, k: int, table: str, uniq: np.ndarray, g: np.ndarray, sel: np.ndarray | None, step: int
    ) -> Call:
        n = len(uniq) if sel is None else len(sel)
        off = align(8 * n)
        buf = self._buffer(k, off + g.shape[1] * 4 * n)
        if buf is None:
            return super()._push_call(k, table, uniq, g, sel, step)
        ids, grads = buf.view(0, np.int64, (n,)), buf.view(off, np.float32, (n, g.shape[1]))
        if sel is None:
            ids[:], grads[:] = uniq, g
        else:
            np.take(uniq, sel, out=ids, mode="clip")  # "raise" would buffer `out`
            np.take(g, sel, axis=0, out=grads, mode="clip")
        return Call(k, "push_shm", (table, buf.path, buf.size, n, off, step), replayable=True, buffer=buf)

    def _release(self, call: Call) -> None:
        if call.buffer is not None:
            call.buffer.busy = False
            call.buffer, call.out = None, None

    @staticmethod
    def _fetch(calls: list[Call]) -> list:
        """Results of calls over either transport, raising the first error met."""
        refs = [c.handle for c in calls if not isinstance(c.handle, Ticket)]
        got = iter(ray.get(refs)) if refs else iter(())
        return [c.handle.result() if isinstance(c.handle, Ticket) else next(got) for c in calls]

    def _wait(self, calls: list[Call]) -> list:
        try:
            out = self._fetch(calls)
        except _FAILURES:
            out = [self._get_one(c) for c in calls]
        for c in calls:
            if c.replayable:  # a push's buffer is free once it is applied; a pull's once read
                self._release(c)
        return out

    def _get_one(self, call: Call):
        for _ in range(4):
            try:
                return self._fetch([call])[0]
            except _FAILURES as e:
                self._handle_failure(call.shard, call.epoch, e)
                if call.replayable:
                    return 0  # re-applied by the replay (or lost with an overflowed log)
                self._resend(call)
        raise PSError(f"shard {call.shard}: {call.method} kept failing after recovery")

    def _reap(self) -> None:
        if not self._inflight:
            return
        refs = [c.handle for c in self._inflight if not isinstance(c.handle, Ticket)]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        finished, pending = [], []
        for c in self._inflight:
            done = c.handle.poll() if isinstance(c.handle, Ticket) else c.handle in ready
            (finished if done else pending).append(c)
        excess = len(pending) - _MAX_INFLIGHT_PER_SHARD * self.num_shards
        if excess > 0:  # back-pressure: wait for the oldest pushes
            finished += pending[:excess]
            pending = pending[excess:]
        self._inflight = pending
        self._wait(finished)

    def _forward(self, call: Call):
        return call.handle

    # ---- failure handling -------------------------------------------------------------------------
    def _resend(self, call: Call) -> None:
        """Submit a failed pull again; as a plain pull if its shard restarted on another node."""
        if call.buffer is not None and not self._local_shard[call.shard]:
            table, n, step = call.args[0], call.args[3], call.args[-1]
            ids = call.buffer.view(0, np.int64, (n,)).copy()
            self._release(call)
            call.method, call.args, call.direct = "pull", (table, ids, step), False
        self._submit(call)

    def _handle_failure(self, k: int, epoch: int, err: BaseException) -> None:
        if epoch < self._epochs[k]:
            return  # issued before a recovery that already covered it
        if not isinstance(err, ShardRestarted):  # ShardRestarted: another client reset it already
            self._reset_shard(k, err)
        hello = ray.get(self._handles[k].hello.remote())
        self._incarnations[k] = hello["incarnation"]
        self._nodes[k] = hello["node_id"]  # Ray may have restarted it on another node
        here = ray.get_runtime_context().get_node_id()
        self._local_shard[k] = self.shared_memory and shm_available() and hello["node_id"] == here
        chan = self._channels.get(k)
        if chan is not None and (chan.closed or not self._local_shard[k]):
            self._drop_channel(k)  # reopened (to the restarted process) on the next data call
        self._epochs[k] += 1
        self._replay(k)
        # the scales now in force (the replay re-applied the logged ones; an overflowed log did not)
        self._fetch([self._call(k, "set_lr_scale", t, s) for t, s in self._lr_scale.items()])
        self.metrics.event("shard_recovered")

    def _reset_shard(self, k: int, err: BaseException) -> None:
        url, manifest, plan = self._recovery
        specs = [s.to_dict() for s in self._specs.values()]
        deadline = time.monotonic() + self.recovery_timeout_s
        while True:
            try:
                known = self._incarnations[k]
                ref = self._handles[k].recover.remote(known, self.slot_map.to_dict(), specs, url, manifest, plan)
                self._incarnations[k] = ray.get(ref)
                return
            except RayActorError as e:
                if time.monotonic() > deadline:
                    raise PSError(f"shard {k} did not come back within {self.recovery_timeout_s:.0f}s") from e
                time.sleep(0.2)

    def _replay(self, k: int) -> None:
        if self._log.overflowed or self.replay_log_bytes <= 0:
            if self.replay_log_bytes > 0:
                warnings.warn(
                    f"PS shard {k} recovered from the checkpoint only: the replay log had overflowed",
                    stacklevel=3,
                )
            self.metrics.event("recovered_without_replay")
            return
        calls: list[Call] = []
        waited = 0  # calls[:waited] have finished
        try:
            for kind, table, step, ids, g in self._log:
                if kind == "import":  # re-read from its source: only shard k's rows
                    self._fetch(calls[waited:])
                    waited = len(calls)
                    self._import_rows(table, g, step, shard=k, wait=self._fetch)
                elif kind in ("evict", "lr_scale"):  # Ray calls: a later channel push must not overtake them
                    args = (table, step) if kind == "evict" else (table, g)
                    calls.append(self._call(k, "evict" if kind == "evict" else "set_lr_scale", *args))
                    self._fetch(calls[waited:])
                    waited = len(calls)
                else:
                    sel = np.flatnonzero(self.slot_map.shard_of(ids) == k)
                    if len(sel):
                        calls += self._submit_all([self._push_call(k, table, ids, g, sel, step)])
            self._fetch(calls[waited:])  # a failure here is a second crash: let it surface
        finally:
            for c in calls:
                self._release(c)
        self.metrics.event("replayed_requests", len(calls))

    def _on_push(self, table: str, step: int, uniq: np.ndarray, g: np.ndarray) -> None:
        if self.replay_log_bytes <= 0 or self._log.overflowed:
            return
        if not self._log.add_push(table, step, uniq, g):
            warnings.warn(
                f"PS replay log exceeded {self.replay_log_bytes} bytes and was dropped: until the next "
                "checkpoint a shard failure loses the pushes since the last one (checkpoint more often "
                "or raise replay_log_bytes)",
                stacklevel=3,
            )
            self.metrics.event("replay_log_overflow")

    def _on_evict(self, table: str, step: int) -> None:
        if self.replay_log_bytes > 0:
            self._log.add_evict(table, step)

    def _on_control(self, kind: str, table: str, arg) -> None:
        if self.replay_log_bytes > 0:
            self._log.add_control(kind, table, self._step[table], arg)

    def _on_commit(self, url: str | None, plan: dict | None = None) -> None:
        self.checkpoint_committed(url, plan)

    def checkpoint_committed(self, url: str, plan: dict | None = None) -> None:
        """A checkpoint at `url` now holds every push this client made: forget them, and recover
        from it. The writer calls this itself; other clients of the same shards must call it too
        (e.g. every Ray Train worker, after the checkpoint of a step). `plan`: how a partial
        restore loaded it (`restore` passes it; None: the whole checkpoint)."""
        from xdtrain.ps.checkpoint import read_manifest

        self._recovery = (url, read_manifest(url) if url else None, plan)
        self.truncate_replay_log()

    def truncate_replay_log(self) -> None:
        """Forget logged pushes (without changing where a failed shard recovers from)."""
        self._log.truncate()

    # ---- metrics --------------------------------------------------------------------------------
    def _record(self, op: str, table: str, rows: int, nbytes: int, seconds: float) -> None:
        super()._record(op, table, rows, nbytes, seconds)
        if self._ray_metrics is None:
            self._ray_metrics = RayMetrics(self.name)
        self._ray_metrics.record(op, table, rows, nbytes, seconds)

    def stats(self, shards: bool = True) -> dict:
        out = super().stats(shards)
        if shards and self._ray_metrics is not None:
            self._ray_metrics.shards(out["shards"])
        return out
