"""Table specs and the per-shard storage of one table.

`ShardTable` keeps the rows this shard owns for one table: an exact id -> position index, the
rows and the optimizer state as numpy arrays that grow by doubling, and, when enabled, the
admission counters and last-update steps. Both backends (in-process and Ray actors) use it.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from xdtrain.ps.index import IdIndex
from xdtrain.ps.init import INITIALIZERS, init_rows, table_key
from xdtrain.ps.optim import OptimizerSpec, apply_update, state_bytes_per_row, state_layout

DTYPES = ("float32", "float16")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_COMPACT_ROWS = 65536
_SCRATCH_BYTES = 512 << 10  # gather chunk for pull_into: fits in L2 with room to spare
_HUGE_MIN_BYTES = 32 << 20  # arrays from this size on go on transparent huge pages


@dataclass(frozen=True)
class TableSpec:
    """A named embedding table.

    min_count: an id gets its own trained row once it has been pulled in `min_count` calls;
      before that it reads the shared default row (zeros) and its pushes are dropped. 1 = off.
    ttl_steps: rows whose last update is more than `ttl_steps` push steps old are removed by
      `evict`. 0 = off.
    """

    name: str
    dim: int
    dtype: str = "float32"
    init: str = "normal"
    init_scale: float = 0.01
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    min_count: int = 1
    ttl_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r}: use 1-128 characters from [A-Za-z0-9_.-]")
        where = f"table {self.name!r}"
        if int(self.dim) < 1:
            raise ValueError(f"{where}: dim must be >= 1, got {self.dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype {self.dtype!r} not supported; expected one of {DTYPES}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"{where}: init {self.init!r} unknown; expected one of {INITIALIZERS}")
        if int(self.min_count) < 1:
            raise ValueError(f"{where}: min_count must be >= 1, got {self.min_count}")
        if int(self.ttl_steps) < 0:
            raise ValueError(f"{where}: ttl_steps must be >= 0 (0 = off), got {self.ttl_steps}")
        if isinstance(self.optimizer, dict):  # from a manifest / YAML
            object.__setattr__(self, "optimizer", OptimizerSpec(**self.optimizer))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TableSpec:
        return cls(**d)

    def bytes_floor_per_row(self) -> int:
        """The least any store needs per row: the vector, its optimizer state and an 8-byte key."""
        return self.dim * np.dtype(self.dtype).itemsize + state_bytes_per_row(self.optimizer, self.dim) + 8


def _empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """np.empty, on transparent huge pages when large: random row gathers then miss the TLB far
    less (measured here: a 32k-row gather from 2M x 64 fp32 rows 1.5x faster)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < _HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dtype)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mem.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP off in this kernel: plain pages
        pass
    return np.frombuffer(mem, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


def _grow(arr: np.ndarray, cap: int) -> np.ndarray:
    out = _empty((cap,) + arr.shape[1:], arr.dtype)
    out[: len(arr)] = arr
    return out


class ShardTable:
    """The rows of one table held by one shard. Ids passed to pull/push must be distinct."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.n = 0
        self.step = 0  # the latest push step this table has seen (drives TTL)
        self.lr_scale = 1.0  # multiplies the optimizer's lr on every push (Router.set_lr_scale)
        self._key = table_key(spec.seed, spec.name)
        self._dtype = np.dtype(spec.dtype)
        self._layout = state_layout(spec.optimizer, spec.dim)
        self.index = IdIndex()
        self.ids = np.empty(0, dtype=np.int64)
        self.rows = np.empty((0, spec.dim), dtype=self._dtype)
        self.state = {k: np.empty((0, w) if w else 0, dtype=dt) for k, (w, dt, _) in self._layout.items()}
        self.last_step = np.empty(0, dtype=np.int64) if spec.ttl_steps else None
        # admission counters for ids seen fewer than min_count times (count -1 = since admitted)
        self._p_index = IdIndex()
        self._p_ids = np.empty(0, dtype=np.int64)
        self._p_counts = np.empty(0, dtype=np.int32)
        self._p_n = 0
        self._p_dead = 0
        self._scratch: np.ndarray | None = None

    # ---- storage -----------------------------------------------------------------------
    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = len(self.ids)
        if need <= cap:
            return
        cap = max(need, 2 * cap, 1024)
        self.ids = _grow(self.ids[: self.n], cap)
        self.rows = _grow(self.rows[: self.n], cap)
        self.state = {k: _grow(v[: self.n], cap) for k, v in self.state.items()}
        if self.last_step is not None:
            self.last_step = _grow(self.last_step[: self.n], cap)

    def _append(self, ids: np.ndarray, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Admit new ids with their initial rows (or `rows`) and fresh optimizer state; returns their
        positions."""
        k = len(ids)
        self._reserve(k)
        pos = np.arange(self.n, self.n + k, dtype=np.int64)
        sl = slice(self.n, self.n + k)
        self.ids[sl] = ids
        if rows is None:
            rows = init_rows(self.spec.init, self.spec.init_scale, self._key, ids, self.spec.dim, self._dtype)
        self.rows[sl] = rows
        for name, (_, _, v0) in self._layout.items():
            self.state[name][sl] = v0
        if self.last_step is not None:
            self.last_step[sl] = step
        self.index.insert(ids, pos, keys=self.ids)
        self.n += k
        return pos

    def _admit(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Count a sighting of each absent id; admit those that reached min_count. -1 = not admitted."""
        if self.spec.min_count <= 1:
            return self._append(ids, step)
        ppos = self._p_index.lookup(ids)
        fresh = ppos < 0
        if fresh.any():
            ppos[fresh] = self._add_pending(ids[fresh], np.zeros(int(fresh.sum()), dtype=np.int32))
        prev = self._p_counts[ppos]
        self._p_dead -= int((prev < 0).sum())  # admitted once, evicted since: counting starts again
        counts = np.maximum(prev, 0) + 1
        self._p_counts[ppos] = counts
        out = np.full(len(ids), -1, dtype=np.int64)
        ready = counts >= self.spec.min_count
        if ready.any():
            out[ready] = self._append(ids[ready], step)
            self._p_counts[ppos[ready]] = -1
            self._p_dead += int(ready.sum())
            if self._p_dead > 1024 and 2 * self._p_dead > self._p_n:
                self._compact_pending(self._p_counts[: self._p_n] >= 0)
        return out

    def _add_pending(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        need = self._p_n + len(ids)
        if need > len(self._p_ids):
            cap = max(need, 2 * len(self._p_ids), 1024)
            self._p_ids = _grow(self._p_ids[: self._p_n], cap)
            self._p_counts = _grow(self._p_counts[: self._p_n], cap)
        pos = np.arange(self._p_n, need, dtype=np.int64)
        self._p_ids[pos] = ids
        self._p_counts[pos] = counts
        self._p_index.insert(ids, pos, keys=self._p_ids)
        self._p_n = need
        return pos

    def _compact_pending(self, keep: np.ndarray) -> None:
        idx = np.flatnonzero(keep)
        self._p_ids = self._p_ids[idx]
        self._p_counts = self._p_counts[idx]
        self._p_n = len(idx)
        self._p_dead = 0
        self._p_index.reset(self._p_ids)

    # ---- the training path --------------------------------------------------------------
    def _positions(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Row positions of `ids`, admitting unknown ids; -1 where an id is not admitted yet."""
        pos = self.index.lookup(ids)
        miss = pos < 0
        if miss.any():
            pos[miss] = self._admit(ids[miss], step)
        return pos

    def pull(self, ids: np.ndarray, step: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of `ids` in storage dtype (into `out` if given); unknown ids are admitted, or read
        the shared zero row until admitted."""
        pos = self._positions(ids, step)
        if self.spec.min_count > 1:
            absent = pos < 0
            if absent.any():
                if out is None:
                    out = np.zeros((len(ids), self.spec.dim), dtype=self._dtype)
                if self.n:
                    np.take(self.rows, np.where(absent, 0, pos), axis=0, out=out, mode="clip")
                out[absent] = 0
                return out
        if out is None:
            return np.take(self.rows, pos, axis=0)
        # positions are valid; mode="raise" (the default) would copy through a temporary `out`
        return np.take(self.rows, pos, axis=0, out=out, mode="clip")

    def pull_into(self, ids: np.ndarray, step: int, out: np.ndarray, where: np.ndarray | None = None) -> None:
        """`pull(ids)` written to out[where] (to out[:len(ids)] if where is None), in out's dtype.

        Rows go through a small scratch buffer, chunk by chunk: gathered rows stay in cache until
        they are placed, instead of a full-size temporary making a round trip through memory.
        """
        n = len(ids)
        if where is None and out.dtype == self._dtype:
            self.pull(ids, step, out=out[:n])
            return
        pos = self._positions(ids, step)
        if self.spec.min_count > 1 and (pos < 0).any():  # rare: rows still at the shared default
            rows = self.pull(ids, step)
            out[slice(0, n) if where is None else where] = rows
            return
        chunk = max(256, _SCRATCH_BYTES // (self.spec.dim * self._dtype.itemsize))
        if self._scratch is None or len(self._scratch) < min(chunk, n):
            self._scratch = np.empty((min(chunk, max(n, 256)), self.spec.dim), dtype=self._dtype)
        for start in range(0, n, chunk):
            p = pos[start : start + chunk]
            buf = self._scratch[: len(p)]
            np.take(self.rows, p, axis=0, out=buf, mode="clip")
            if where is None:
                out[start : start + len(p)] = buf
            else:
                out[where[start : start + len(p)]] = buf

    def push(self, ids: np.ndarray, grads: np.ndarray, step: int = 0) -> int:
        """Apply the optimizer to the rows of `ids`; returns how many rows were updated."""
        if grads.shape != (len(ids), self.spec.dim):
            raise ValueError(
                f"table {self.spec.name!r}: grads shape {tuple(grads.shape)} != ({len(ids)}, {self.spec.dim})"
            )
        self.step = max(self.step, int(step))
        pos = self.index.lookup(ids)
        miss = pos < 0
        if miss.any():
            if self.spec.min_count <= 1:  # e.g. a push replayed after recovery, before any pull
                pos[miss] = self._append(ids[miss], step)
            else:  # not admitted yet: the push is dropped
                keep = ~miss
                pos, grads = pos[keep], grads[keep]
        apply_update(self.spec.optimizer, self.rows, self.state, pos, grads, self.lr_scale)
        if self.last_step is not None:
            self.last_step[pos] = step
        return len(pos)

    def evict(self, step: int) -> int:
        """Remove rows last updated more than ttl_steps before `step`; returns how many."""
        if not self.spec.ttl_steps or self.last_step is None:
            return 0
        self.step = max(self.step, int(step))
        expired = self.last_step[: self.n] < self.step - self.spec.ttl_steps
        k = int(expired.sum())
        if k:
            self.drop(np.flatnonzero(expired))
        return k

    def assign(self, ids: np.ndarray, rows: np.ndarray, step: int = 0) -> int:
        """Set the rows of `ids` (distinct) to `rows`, admitting absent ids, with fresh optimizer
        state (an import: the vectors are new, moments of the old ones would be wrong). Idempotent."""
        if rows.shape != (len(ids), self.spec.dim):
            raise ValueError(
                f"table {self.spec.name!r}: rows shape {tuple(rows.shape)} != ({len(ids)}, {self.spec.dim})"
            )
        self.step = max(self.step, int(step))
        pos = self.index.lookup(ids)
        old = pos >= 0
        if (~old).any():
            pos[~old] = self._append(ids[~old], step, rows[~old])
            if self.spec.min_count > 1:  # admitted by the import: their admission counters are done
                ppos = self._p_index.lookup(ids[~old])
                ppos = ppos[ppos >= 0]
                ppos = ppos[self._p_counts[ppos] >= 0]
                self._p_counts[ppos] = -1
                self._p_dead += len(ppos)
        if old.any():
            p = pos[old]
            self.rows[p] = rows[old]
            for name, (_, _, v0) in self._layout.items():
                self.state[name][p] = v0
            if self.last_step is not None:
                self.last_step[p] = step
        return len(ids)

    # ---- bulk moves (resharding, checkpoints) ---------------------------------------------
    def columns(self) -> dict[str, np.ndarray]:
        """Views of the live per-row arrays, by column name."""
        cols = {"ids": self.ids[: self.n], "rows": self.rows[: self.n]}
        cols.update({f"state.{k}": v[: self.n] for k, v in self.state.items()})
        if self.last_step is not None:
            cols["last_step"] = self.last_step[: self.n]
        return cols

    def pending_columns(self) -> dict[str, np.ndarray]:
        live = np.flatnonzero(self._p_counts[: self._p_n] >= 0)
        return {"pending_ids": self._p_ids[live], "pending_counts": self._p_counts[live]}

    def take(self, row_pos: np.ndarray, pending_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Copies of the rows at `row_pos` (and of the live admission counters selected by mask)."""
        out = {k: np.take(v, row_pos, axis=0) for k, v in self.columns().items()}
        pend = self.pending_columns()
        sel = pending_mask if pending_mask is not None else np.zeros(len(pend["pending_ids"]), bool)
        out.update({k: v[sel] for k, v in pend.items()})
        out["step"] = np.asarray([self.step], dtype=np.int64)
        return out

    def insert(self, cols: dict[str, np.ndarray]) -> None:
        """Add rows (and admission counters) taken from another shard or read from a checkpoint.
        Optimizer state columns left out (a restore with fresh optimizer state) start at their
        initial values."""
        ids = np.ascontiguousarray(cols["ids"], dtype=np.int64)
        if (self.index.lookup(ids) >= 0).any():
            raise ValueError(f"table {self.spec.name!r}: inserted ids already present on this shard")
        k = len(ids)
        self._reserve(k)
        sl = slice(self.n, self.n + k)
        self.ids[sl] = ids
        self.rows[sl] = cols["rows"]
        for name, (_, _, v0) in self._layout.items():
            self.state[name][sl] = cols.get(f"state.{name}", v0)
        if self.last_step is not None:
            self.last_step[sl] = cols["last_step"] if "last_step" in cols else self.step
        self.index.insert(ids, np.arange(self.n, self.n + k, dtype=np.int64), keys=self.ids)
        self.n += k
        if "step" in cols and len(cols["step"]):
            self.step = max(self.step, int(cols["step"][0]))
        pids = cols.get("pending_ids")
        if pids is not None and len(pids):
            pids = np.ascontiguousarray(pids, dtype=np.int64)
            if (self._p_index.lookup(pids) >= 0).any():
                raise ValueError(f"table {self.spec.name!r}: inserted admission counters already present")
            self._add_pending(pids, np.asarray(cols["pending_counts"], dtype=np.int32))

    def drop(self, row_pos: np.ndarray, pending_mask: np.ndarray | None = None) -> None:
        """Remove rows at `row_pos` (and selected admission counters), compacting in place."""
        keep = np.ones(self.n, dtype=bool)
        keep[row_pos] = False
        kept = np.flatnonzero(keep)
        arrays = [self.ids, self.rows, *self.state.values()]
        if self.last_step is not None:
            arrays.append(self.last_step)
        # kept[i] >= i, so moving rows down chunk by chunk never overwrites a row still to be read
        for start in range(0, len(kept), _COMPACT_ROWS):
            src = kept[start : start + _COMPACT_ROWS]
            for arr in arrays:
                arr[start : start + len(src)] = arr[src]
        self.n = len(kept)
        self.index.reset(self.ids[: self.n])
        if pending_mask is not None and pending_mask.any():
            live = np.flatnonzero(self._p_counts[: self._p_n] >= 0)
            keep_p = np.zeros(self._p_n, dtype=bool)
            keep_p[live[~pending_mask]] = True
            self._compact_pending(keep_p)

    def nbytes(self) -> int:
        """Bytes held for this table (arrays at capacity, plus the hash indexes)."""
        arrays = [self.ids, self.rows, *self.state.values(), self._p_ids, self._p_counts]
        if self.last_step is not None:
            arrays.append(self.last_step)
        return sum(a.nbytes for a in arrays) + self.index.nbytes + self._p_index.nbytes
