"""The client logic both backends share: dedup, routing by slot, reassembly, prefetch.

A backend supplies the transport (`_submit`/`_wait`/`_reap`) and shard lifecycle
(`_add_shards`/`_close_shards`); everything a user calls lives here, so the in-process
backend and the Ray client behave identically.

Ordering: calls from one client to one shard run in submission order (Ray guarantees it per
caller; the in-process backend runs them immediately). Pushes are asynchronous: `push`
returns once the requests are submitted, a later pull from the same client still sees them,
and `flush()` waits for all of them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xdtrain.ps.bulk import WholeTableOps
from xdtrain.ps.ids import RoutedIds, as_ids, dedup, route_ids, shard_blocks
from xdtrain.ps.metrics import PSStats
from xdtrain.ps.optim import check_lr_scale
from xdtrain.ps.slots import SlotMap
from xdtrain.ps.table import TableSpec

_MAX_PREFETCH = 8
_KEEP_ROUTES = 4


@dataclass
class Call:
    """One request to one shard; `replayable` calls (pushes) are recovered by log replay, not resent."""

    shard: int
    method: str
    args: tuple
    replayable: bool = False
    handle: Any = None
    buffer: Any = None  # a shared-memory buffer the call owns until released
    out: np.ndarray | None = None  # where a shared-memory pull's rows land
    direct: bool = False  # the shard wrote its rows straight into the pull's output array
    epoch: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class PendingPull:
    table: str
    uniq: np.ndarray
    inverse: np.ndarray | None
    groups: list[tuple[int, np.ndarray | None]]
    calls: list[Call]
    issue_step: int
    ids: np.ndarray | None = None  # the caller's ids, kept to match a prefetch
    out: np.ndarray | None = None  # float32 (len(uniq), dim) output the shards write into, if any


def _group_by_shard(uniq: np.ndarray, inverse: np.ndarray, groups: list) -> tuple:
    """Reorder distinct ids so each shard's are contiguous, and fold that into `inverse`.

    The rows are gathered through `inverse` anyway when ids repeat, so this costs one pass over
    the ids, and each shard then writes its rows as one block instead of scattering them.
    """
    order, blocks = shard_blocks(groups)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return uniq[order], rank[inverse], [(k, np.arange(a, b, dtype=np.int64)) for k, a, b in blocks]


def contiguous(sel: np.ndarray | None) -> bool:
    """True when increasing positions `sel` form one block (None: all positions)."""
    return sel is None or len(sel) == 0 or int(sel[-1]) - int(sel[0]) + 1 == len(sel)


class Router(WholeTableOps, ABC):
    """Everything a PS client does, over an abstract set of shards."""

    def __init__(self, slot_map: SlotMap, staleness: int = 0) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.slot_map = slot_map
        self.staleness = int(staleness)
        self._specs: dict[str, TableSpec] = {}
        self._step: dict[str, int] = {}
        self._lr_scale: dict[str, float] = {}  # tables whose lr scale was set (the rest: 1.0)
        self.metrics = PSStats()
        self._reset_local_state()

    def _reset_local_state(self) -> None:
        self._prefetched: dict[str, list[PendingPull]] = {}
        self._recent: dict[str, list[tuple[int, np.ndarray]]] = {}  # pushes seen by open prefetches
        self._inflight: list[Call] = []
        self._routes: list[tuple[np.ndarray, RoutedIds]] = []  # recent (ids, route(ids))

    # ---- transport, supplied by a backend ----------------------------------------------------
    @abstractmethod
    def _submit(self, call: Call) -> None:
        """Start `call` (set call.handle)."""

    @abstractmethod
    def _wait(self, calls: list[Call]) -> list:
        """Results of `calls`, in order (recovering failed shards where the backend can)."""

    @abstractmethod
    def _reap(self) -> None:
        """Drop finished in-flight pushes from self._inflight, raising on their errors."""

    @abstractmethod
    def _add_shards(self, indices: list[int], slot_map: SlotMap) -> None:
        """Start empty shards at these indices."""

    @abstractmethod
    def _close_shards(self, indices: list[int]) -> None:
        """Stop these shards (they hold nothing any more)."""

    def _pull_output(self, table: str, n: int, groups: list) -> tuple[np.ndarray, Any] | None:
        """(a float32 (n, dim) array the shards can write into directly, its handle), or None."""
        return None

    def _pull_call(
        self, k: int, table: str, uniq: np.ndarray, sel: np.ndarray | None, step: int, out: Any = None
    ) -> Call:
        """The request (not yet submitted) for shard k's rows of uniq[sel] (all of uniq if sel is
        None); `out`: the handle from _pull_output, if the shard may write them to their places."""
        return Call(k, "pull", (table, uniq if sel is None else uniq[sel], step))

    def _push_call(
        self, k: int, table: str, uniq: np.ndarray, g: np.ndarray, sel: np.ndarray | None, step: int
    ) -> Call:
        """The request (not yet submitted) that sends shard k the gradients of uniq[sel]."""
        ids_k, g_k = (uniq, g) if sel is None else (uniq[sel], g[sel])
        return Call(k, "push", (table, ids_k, g_k, step), replayable=True)

    def _submit_all(self, calls: list[Call]) -> list[Call]:
        # every request is written before the first goes out: once a shard starts working it
        # competes for the CPU with the client, which would slow the rest of the preparation
        for call in calls:
            self._submit(call)
        return calls

    def _rows_of(self, call: Call, result: Any) -> np.ndarray:
        """The rows a finished pull call produced."""
        return result if call.out is None else call.out

    def _release(self, call: Call) -> None:  # noqa: B027
        """Hook: the call's result has been consumed (its shared buffer may be reused)."""

    def _on_push(self, table: str, step: int, uniq: np.ndarray, g: np.ndarray) -> None:  # noqa: B027
        """Hook: a push of (distinct ids, summed grads) was submitted (the Ray client logs it)."""

    def _on_evict(self, table: str, step: int) -> None:  # noqa: B027
        """Hook: an eviction was submitted."""

    def _on_commit(self, url: str | None, plan: dict | None = None) -> None:  # noqa: B027
        """Hook: the shards now equal the checkpoint at `url` (after checkpoint or restore), as
        loaded by `plan` (checkpoint.restore_plan; None: the whole checkpoint)."""

    def _on_control(self, kind: str, table: str, arg: Any) -> None:  # noqa: B027
        """Hook: a change that is not a push ("lr_scale": scale, "import": (url, id col, vector col))
        is about to reach the shards (the Ray client logs it for replay)."""

    def _record(self, op: str, table: str, rows: int, nbytes: int, seconds: float) -> None:
        self.metrics.record(op, rows, nbytes, seconds)

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self.slot_map.num_shards

    def _call(self, shard: int, method: str, *args: Any, replayable: bool = False) -> Call:
        call = Call(shard, method, args, replayable)
        self._submit(call)
        return call

    def _all(self, method: str, *args: Any) -> list:
        return self._wait([self._call(k, method, *args) for k in range(self.num_shards)])

    def _spec(self, table: str) -> TableSpec:
        try:
            return self._specs[table]
        except KeyError:
            raise KeyError(f"no PS table {table!r}; tables: {sorted(self._specs)}") from None

    def _route(self, uniq: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in uniq) per shard with ids; positions None means all of them."""
        if self.num_shards == 1:
            return [(0, None)]
        groups = self.slot_map.split(uniq)
        if len(groups) == 1:
            return [(groups[0][0], None)]
        return groups

    def route(self, ids: Any) -> RoutedIds:
        """Distinct `ids` grouped by shard, for a later pull/push/prefetch that then skips dedup and
        routing, and whose rows each shard writes as one block (see `RoutedIds`).

        The last few results are kept: a batch's pull routes the ids its prefetch routed already,
        and finding them again (one comparison) costs a fraction of routing them.
        """
        ids = as_ids(ids)
        for source, routed in self._routes:
            if routed.slot_map is self.slot_map and len(source) == len(ids) and np.array_equal(source, ids):
                return routed
        routed = route_ids(ids, self.slot_map)
        self._routes = [(ids.copy(), routed), *self._routes[: _KEEP_ROUTES - 1]]
        return routed

    def _unpack(self, ids: Any) -> tuple[np.ndarray, list | None]:
        """(int64 ids, their shard groups when routed under the current slot map, else None)."""
        if isinstance(ids, RoutedIds):
            return ids.ids, ids.groups() if ids.slot_map is self.slot_map and len(ids) else None
        return as_ids(ids), None

    # ---- tables --------------------------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> None:
        """Create (or, with an identical spec, re-declare) a table on every shard."""
        self._all("create_table", spec)
        self._specs[spec.name] = spec
        self._step.setdefault(spec.name, 0)

    def tables(self) -> list[str]:
        return sorted(self._specs)

    def set_lr_scale(self, table: str, scale: float) -> None:
        """Multiply `table`'s optimizer lr by `scale` on every push from now until changed (e.g. one
        scale per table per phase). Kept in checkpoints and re-applied when a shard recovers.

        Pushes issued before the call use the old scale. Every client that pushes to the table
        should set the same scale at the same point (e.g. each worker at a phase boundary): a
        shard reset by a client that never set it would run on with that client's scale.
        """
        self._spec(table)
        s = check_lr_scale(table, scale)
        self._on_control("lr_scale", table, s)
        self._all("set_lr_scale", table, s)
        self._lr_scale[table] = s

    def lr_scale(self, table: str) -> float:
        self._spec(table)
        return self._lr_scale.get(table, 1.0)

    def spec(self, table: str) -> TableSpec:
        return self._spec(table)

    def shard_info(self) -> list[dict]:
        """Per shard: {table: {rows, bytes, step}}."""
        self.flush()
        return self._all("info")

    def num_rows(self, table: str) -> int:
        self._spec(table)
        return sum(info[table]["rows"] for info in self.shard_info())

    # ---- pull / push ---------------------------------------------------------------------------
    def _start_pull(self, table: str, ids: np.ndarray, groups: list | None = None) -> PendingPull:
        """Send the pull requests; `groups`: the shards of ids (distinct) already known (routed ids)."""
        if groups is not None:
            uniq, inverse = ids, None
        else:
            uniq, inverse = dedup(ids)
            groups = self._route(uniq) if len(uniq) else []
            if inverse is not None and len(groups) > 1:
                uniq, inverse, groups = _group_by_shard(uniq, inverse, groups)
        step = self._step[table]
        direct = self._pull_output(table, len(uniq), groups) if len(uniq) else None
        handle = direct[1] if direct else None
        calls = self._submit_all([self._pull_call(k, table, uniq, sel, step, handle) for k, sel in groups])
        return PendingPull(table, uniq, inverse, groups, calls, step, out=direct[0] if direct else None)

    def _finish_pull(self, req: PendingPull) -> np.ndarray:
        """Rows of req.uniq as a writable float32 array (owned by the caller)."""
        try:
            results = self._wait(req.calls)
            dim = self._specs[req.table].dim
            if req.out is not None:
                for (_, sel), call, r in zip(req.groups, req.calls, results):
                    if not call.direct:
                        req.out[slice(None) if sel is None else sel] = self._rows_of(call, r)
                return req.out
            if len(req.groups) == 1 and req.groups[0][1] is None:
                r = self._rows_of(req.calls[0], results[0])
                if r.dtype == np.float32 and r.flags.writeable and req.calls[0].out is None:
                    return r
                return r.astype(np.float32)
            out = np.empty((len(req.uniq), dim), dtype=np.float32)
            for (_, sel), call, r in zip(req.groups, req.calls, results):
                out[sel] = self._rows_of(call, r)
            return out
        finally:
            for call in req.calls:
                self._release(call)

    def _discard(self, req: PendingPull) -> None:
        """Drop an unused prefetch (after it finishes, so its buffers are free)."""
        try:
            self._wait(req.calls)
        finally:
            for call in req.calls:
                self._release(call)

    def _drop_prefetches(self) -> None:
        for queue in self._prefetched.values():
            for req in queue:
                self._discard(req)
        self._prefetched.clear()
        self._recent.clear()

    def pull(self, table: str, ids: Any) -> torch.Tensor:
        """Rows for `ids` (any shape; flattened; or `RoutedIds`: rows in their order) as a float32
        tensor of shape (len(ids), dim)."""
        self._spec(table)
        ids, groups = self._unpack(ids)
        t0 = time.perf_counter()
        self._reap()
        req = self._take_prefetch(table, ids)
        prefetched = req is not None
        if req is None:
            req = self._start_pull(table, ids, groups)
        out = self._finish_pull(req)
        if prefetched:
            self._patch(req, out)
        if not self._prefetched.get(table):
            self._recent.pop(table, None)
        rows = out if req.inverse is None else out[req.inverse]
        self._record("pull", table, len(out), out.nbytes + 8 * len(out), time.perf_counter() - t0)
        return torch.from_numpy(rows)

    def push(self, table: str, ids: Any, grads: Any) -> None:
        """Send row gradients (summed over repeated ids; or for `RoutedIds`, one per id in their
        order); the shard's optimizer applies them."""
        spec = self._spec(table)
        ids, groups = self._unpack(ids)
        t0 = time.perf_counter()
        if isinstance(grads, torch.Tensor):
            grads = grads.detach().to("cpu", torch.float32).numpy()
        g = np.ascontiguousarray(grads, dtype=np.float32).reshape(len(ids), -1)
        if g.shape[1] != spec.dim:
            raise ValueError(f"table {table!r}: grads have width {g.shape[1]}, the table has dim {spec.dim}")
        uniq, inverse = (ids, None) if groups is not None else dedup(ids)
        if inverse is not None:
            summed = torch.zeros(len(uniq), spec.dim, dtype=torch.float32)
            summed.index_add_(0, torch.from_numpy(inverse), torch.from_numpy(g))
            g = summed.numpy()
        self._reap()
        self._step[table] += 1
        step = self._step[table]
        if groups is None:
            groups = self._route(uniq) if len(uniq) else []
        calls = [self._push_call(k, table, uniq, g, sel, step) for k, sel in groups]
        self._inflight += self._submit_all(calls)
        self._on_push(table, step, uniq, g)
        if self._prefetched.get(table):
            self._recent.setdefault(table, []).append((step, uniq))
        self._record("push", table, len(uniq), g.nbytes + 8 * len(uniq), time.perf_counter() - t0)

    def flush(self) -> None:
        """Wait until every push submitted so far has been applied."""
        calls, self._inflight = self._inflight, []
        if calls:
            self._wait(calls)

    # ---- prefetch with bounded staleness ------------------------------------------------------
    def prefetch(self, table: str, ids: Any) -> None:
        """Start pulling `ids` now; a later `pull(table, ids)` with equal ids uses the result.

        The rows it returns reflect every push issued at least `staleness` pushes before that
        pull: pushes issued before the prefetch are in it, and if more than `staleness` pushes
        came since, the rows those pushes touched are pulled again (staleness 0: exact).
        """
        self._spec(table)
        ids, groups = self._unpack(ids)
        ids = ids.copy()
        req = self._start_pull(table, ids, groups)
        req.ids = ids
        queue = self._prefetched.setdefault(table, [])
        queue.append(req)
        if len(queue) > _MAX_PREFETCH:
            self._discard(queue.pop(0))

    def _take_prefetch(self, table: str, ids: np.ndarray) -> PendingPull | None:
        queue = self._prefetched.get(table, [])
        for i, req in enumerate(queue):
            if req.ids is not None and len(req.ids) == len(ids) and np.array_equal(req.ids, ids):
                return queue.pop(i)
        return None

    def _patch(self, req: PendingPull, out: np.ndarray) -> None:
        """Re-pull the rows pushed since the prefetch was issued, if it is now too stale."""
        table = req.table
        if self._step[table] - req.issue_step <= self.staleness:
            return
        touched = [u for step, u in self._recent.get(table, []) if step > req.issue_step]
        if not touched:
            return
        mask = np.isin(req.uniq, np.concatenate(touched))
        if mask.any():
            fresh = self._finish_pull(self._start_pull(table, req.uniq[mask]))
            out[mask] = fresh
            self.metrics.event("prefetch_rows_refreshed", int(mask.sum()))
        oldest = min((r.issue_step for r in self._prefetched.get(table, [])), default=None)
        if oldest is None:
            self._recent.pop(table, None)
        else:
            self._recent[table] = [(s, u) for s, u in self._recent.get(table, []) if s > oldest]

    # ---- eviction --------------------------------------------------------------------------------
    def evict(self, table: str) -> int:
        """Drop rows of `table` not updated within its ttl_steps (counted in this client's pushes)."""
        spec = self._spec(table)
        if not spec.ttl_steps:
            return 0
        self.flush()
        step = self._step[table]
        calls = [self._call(k, "evict", table, step, replayable=True) for k in range(self.num_shards)]
        self._on_evict(table, step)
        return int(sum(self._wait(calls)))

    # ---- metrics ---------------------------------------------------------------------------------
    def stats(self, shards: bool = True) -> dict:
        """Throughput and latency per operation, plus rows and bytes held per shard and table."""
        out = self.metrics.summary()
        if shards:
            out["shards"] = self.shard_info()
        return out
