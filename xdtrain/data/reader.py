"""Streaming Parquet reader: rank sharding, bounded shuffle, and an exact, cheap cursor.

The dataset's units are its row groups, `(file, row_group)`. Each rank owns a fixed, disjoint
set of units (balanced by row count), so `num_rows()` is known from footers alone. An epoch:

1. orders the rank's units (file order, or shuffled with rng(seed, epoch) when shuffling);
2. packs them, in that order, into windows of at most `shuffle_buffer` rows (at least one unit);
3. reads one window at a time, permutes its rows with rng(seed, epoch, window), and emits
   batches of `batch_size` rows (a batch may span two windows; only the epoch's last is short).

Everything is a pure function of (dataset footers, seed, epoch), so the cursor is just
`(epoch, rows_emitted)`: a restored reader re-reads only the window holding that row and
skips what was already emitted. No row is skipped or read twice. Memory holds the current
window and `prefetch` windows being read ahead in threads, whatever the dataset's size.

Elastic resume: the cursors of *all* ranks of a run with another world size describe exactly
which rows of the epoch were consumed (each rank's order is a pure function too), so
`load_global_state` rebuilds every old rank's plan, takes what each had not yet emitted (whole
units, plus the tail of the window it was in), and splits that remainder into contiguous, equal
shares for the new ranks, which pack and shuffle their share like an ordinary epoch. The
remainder is recorded in the state as the old world size and per-rank cursors (a "level"), so
it stays small, and a second change of world size in the same epoch just adds a level.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.data.validate import Unit, list_units, open_dataset, read_unit

__all__ = ["ParquetStreamReader", "Unit", "list_units", "shard_units"]

STATE_VERSION = 1

# A resumed epoch is described by the previous worlds' cursors: ((world_size, rows of each rank), ...).
Levels = tuple[tuple[int, tuple[int, ...]], ...]


def shard_units(units: list[Unit], world_size: int, rank: int) -> list[Unit]:
    """The units of `rank`: disjoint across ranks, union = all, row counts balanced.

    Greedy: largest unit first, each to the rank with the fewest rows so far (ties: lowest rank,
    then canonical order), so every rank computes the same assignment. Returned in canonical order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    loads = [(0, r) for r in range(world_size)]
    mine = []
    for i in sorted(range(len(units)), key=lambda i: (-units[i].num_rows, i)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(i)
        heapq.heappush(loads, (load + units[i].num_rows, r))
    return [units[i] for i in sorted(mine)]


# --- epoch plans: what a rank reads, window by window ---------------------------------------------


@dataclass(frozen=True)
class _Window:
    """Rows read and shuffled together: its sources' rows concatenated, then permuted by `key`."""

    sources: tuple[Unit | _Slice, ...]
    key: tuple[int, ...] | None  # entropy of the permutation; None keeps the order
    num_rows: int


@dataclass(frozen=True)
class _Slice:
    """Rows [lo, hi) of a window after its permutation (e.g. the part of it not yet emitted)."""

    window: _Window
    lo: int
    hi: int

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo


def _remainder(plan: list[_Window], done: int) -> list[Unit | _Slice]:
    """What `plan` has not emitted after its first `done` rows: the open window's tail, later sources."""
    out: list[Unit | _Slice] = []
    start = 0
    for w in plan:
        if done <= start:
            out.extend(w.sources)
        elif done < start + w.num_rows:
            out.append(_Slice(w, done - start, w.num_rows))
        start += w.num_rows
    return out


def _share(pieces: list[Unit | _Slice], world_size: int, rank: int) -> list[Unit | _Slice]:
    """Rank's contiguous share (equal within one row) of the concatenated pieces, cut at the edges."""
    total = sum(p.num_rows for p in pieces)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out: list[Unit | _Slice] = []
    start = 0
    for p in pieces:
        end = start + p.num_rows
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append(p if (a, b) == (start, end) else _cut(p, a - start, b - start))
        start = end
    return out


def _cut(p: Unit | _Slice, lo: int, hi: int) -> _Slice:
    if isinstance(p, _Slice):
        return _Slice(p.window, p.lo + lo, p.lo + hi)
    return _Slice(_Window((p,), None, p.num_rows), lo, hi)  # rows [lo, hi) of a row group, in file order


class ParquetStreamReader:
    """Iterate a rank's shard of a Parquet dataset as `pyarrow.RecordBatch`es of `batch_size` rows.

    `shuffle_buffer` is in rows: 0 reads in file order; otherwise row groups are visited in a
    seeded order and rows are shuffled within windows of up to `shuffle_buffer` rows (a single row
    group larger than that is a window by itself). Schemas are checked on open (footers only),
    nulls in key columns as each row group is read; bad data raises `DataError` naming the file.
    `prefetch` windows are read ahead in threads (0: read in the consuming thread).
    """

    def __init__(
        self,
        url: str,
        table: str = "interactions",
        *,
        batch_size: int = 1024,
        columns: list[str] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        storage_options: dict | None = None,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0 or seed < 0 or prefetch < 0:
            raise ValueError(
                f"shuffle_buffer, seed, prefetch must be >= 0: {shuffle_buffer}, {seed}, {prefetch}"
            )
        self.ds = open_dataset(url, table, columns, storage_options)
        self.units = shard_units(self.ds.units, world_size, rank)
        if not self.units:
            raise DataError(
                f"{url}: rank {rank} of {world_size} gets no data, the dataset has only "
                f"{len(self.ds.units)} row group(s); write more row groups or use fewer workers"
            )
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.world_size, self.rank, self.prefetch = world_size, rank, prefetch
        self.epoch = 0
        self._rows_emitted = 0  # rows of `epoch`'s plan already yielded by this rank
        self._levels: Levels = ()  # non-empty only in an epoch resumed from another world size
        self._plan_cache: tuple[tuple, list[_Window]] | None = None

    @property
    def schema(self) -> pa.Schema:
        return self.ds.schema

    def num_rows(self) -> int:
        """Rows in this rank's shard per ordinary epoch (from footers)."""
        return sum(u.num_rows for u in self.units)

    def epoch_rows(self) -> int:
        """Rows this rank yields in the current epoch: `num_rows()`, or its share of an elastic remainder."""
        return self._plan_rows(self.epoch, self._levels)

    def __len__(self) -> int:
        """Batches in the current epoch (the last may be short)."""
        return -(-self.epoch_rows() // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; the current epoch keeps its cursor, so a restored reader resumes."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._rows_emitted, self._levels = epoch, 0, ()

    # --- cursor -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_units": len(self.units),
            "num_rows": self.num_rows(),
        }

    def state_dict(self) -> dict:
        """A small JSON-able cursor: the epoch, the rows of it this rank has yielded, and (only in an
        epoch resumed from other world sizes) those worlds' cursors, `elastic`."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "rows_emitted": self._rows_emitted,
            "elastic": [{"world_size": w, "rows": list(rows)} for w, rows in self._levels],
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output; the next iteration yields exactly the rows not yet yielded.

        The reader must be built with the same dataset, seed, shuffle_buffer, world_size and rank
        (batch_size may differ); anything else raises ValueError naming the mismatch. To resume on
        another world size, use `load_global_state` with every old rank's state.
        """
        _check_version(state)
        for key, ours in {"sampler": None, **self._fingerprint()}.items():  # a sampling reader's cursor is not ours
            if state.get(key) != ours:
                raise ValueError(f"reader state has {key}={state.get(key)!r} but this reader has {ours!r}")
        epoch, levels = int(state["epoch"]), _parse_levels(state.get("elastic", []))
        rows, total = int(state["rows_emitted"]), self._plan_rows(epoch, levels)
        if not 0 <= rows <= total:
            raise ValueError(f"reader state rows_emitted={rows} outside [0, {total}]")
        self.epoch, self._levels, self._rows_emitted = epoch, levels, rows

    def load_global_state(self, states: list[dict]) -> None:
        """Resume from the states of every rank of a previous run, of any world size.

        Same world size: the same as `load_state_dict(states[rank])`. Otherwise this rank takes its
        share of the rows of the current epoch that no old rank had yielded (the shares of all new
        ranks are disjoint, cover the remainder, and differ by at most one row); the next
        `set_epoch` starts an ordinary epoch. Old ranks may be at most one epoch apart only if the
        ones ahead have yielded nothing of the new epoch yet (they finished the old one).
        """
        if not states:
            raise ValueError("load_global_state needs the reader state of every old rank, got none")
        for s in states:
            _check_version(s)
            ours = self._fingerprint()
            for key in ("seed", "shuffle_buffer", "sampler"):
                if s.get(key) != ours.get(key):
                    raise ValueError(
                        f"reader state of rank {s.get('rank')} has {key}={s.get(key)!r} "
                        f"but this reader has {ours.get(key)!r}"
                    )
        world = states[0].get("world_size")
        by_rank = {s.get("rank"): s for s in states}
        if (
            not isinstance(world, int)
            or any(s.get("world_size") != world for s in states)
            or len(states) != world
            or set(by_rank) != set(range(world))
        ):
            raise ValueError(
                "reader states must come from every rank of one world: got ranks "
                f"{[s.get('rank') for s in states]} "
                f"of world sizes {sorted({s.get('world_size') for s in states})}"
            )
        for r, s in by_rank.items():  # the same dataset: each old rank's shard matches the footers
            units = shard_units(self.ds.units, world, r)
            if (s.get("num_units"), s.get("num_rows")) != (len(units), sum(u.num_rows for u in units)):
                raise ValueError(
                    f"reader state of rank {r} has {s.get('num_units')} units / {s.get('num_rows')} rows, "
                    f"but this dataset gives that rank {len(units)} / {sum(u.num_rows for u in units)}"
                )
        if world == self.world_size:
            self.load_state_dict(by_rank[self.rank])
            return

        epoch = min(int(s["epoch"]) for s in states)
        current = [by_rank[r] for r in range(world) if int(by_rank[r]["epoch"]) == epoch]
        levels = _parse_levels(current[0].get("elastic", []))
        if any(_parse_levels(s.get("elastic", [])) != levels for s in current):
            raise ValueError(f"reader states of epoch {epoch} disagree on how it was resumed ('elastic')")
        done = []
        for r in range(world):
            s = by_rank[r]
            if int(s["epoch"]) == epoch:
                done.append(int(s["rows_emitted"]))
            elif int(s["epoch"]) == epoch + 1 and int(s["rows_emitted"]) == 0 and not s.get("elastic"):
                # This rank finished `epoch` and moved on: all of its plan was yielded.
                done.append(self._plan_rows(epoch, levels, world, r))
            else:
                raise ValueError(
                    f"reader states are in epochs {epoch} and {s['epoch']} with rows yielded in both; "
                    "resume every rank from a checkpoint taken at the same step"
                )
        if not levels and not any(done):  # nothing consumed yet: an ordinary epoch
            self.epoch, self._levels, self._rows_emitted = epoch, (), 0
            return
        new_levels = (*levels, (world, tuple(done)))
        self._plan_rows(epoch, new_levels)  # validates the cursors
        self.epoch, self._levels, self._rows_emitted = epoch, new_levels, 0

    # --- plan and read ------------------------------------------------------------------------

    def windows(self, epoch: int) -> list[list[Unit]]:
        """The ordinary epoch's windows: the rank's units in visiting order, packed by `shuffle_buffer`."""
        return [list(w.sources) for w in self._pack(self.units, (self.seed, epoch))]

    def _pack(self, pieces: list, key: tuple[int, ...]) -> list[_Window]:
        """Visit `pieces` in an order seeded by `key`, packed into windows of up to `shuffle_buffer` rows."""
        if self.shuffle_buffer == 0:
            return [_Window((p,), None, p.num_rows) for p in pieces]
        groups: list[list] = []
        rows = 0
        for i in np.random.default_rng(list(key)).permutation(len(pieces)):
            p = pieces[i]
            if groups and rows + p.num_rows <= self.shuffle_buffer:
                groups[-1].append(p)
                rows += p.num_rows
            else:
                groups.append([p])
                rows = p.num_rows
        return [_Window(tuple(g), (*key, i), sum(p.num_rows for p in g)) for i, g in enumerate(groups)]

    def _plan_rows(self, epoch: int, levels: Levels, world_size: int | None = None, rank: int | None = None) -> int:
        """Rows `rank` (default: this one) yields in `epoch` after `levels`; ValueError on bad cursors.
        The cursor logic above needs only this of an epoch's plan (a sampling reader overrides it)."""
        return sum(w.num_rows for w in self._plan(epoch, levels, world_size, rank))

    def _plan(self, epoch: int, levels: Levels, world_size: int | None = None, rank: int | None = None):
        """The windows `rank` (default: this one) reads in `epoch`, after the resumes listed in `levels`."""
        world_size = self.world_size if world_size is None else world_size
        rank = self.rank if rank is None else rank
        mine = (world_size, rank) == (self.world_size, self.rank)
        if mine and self._plan_cache is not None and self._plan_cache[0] == (epoch, levels):
            return self._plan_cache[1]
        remaining = None  # None: the whole epoch
        for depth, (old_world, done) in enumerate(levels):
            if len(done) != old_world:
                raise ValueError(
                    f"reader state 'elastic' level {depth} lists {len(done)} ranks, not {old_world}"
                )
            pieces = []
            for r in range(old_world):
                plan = self._rank_plan(epoch, depth, remaining, old_world, r)
                total = sum(w.num_rows for w in plan)
                if not 0 <= done[r] <= total:
                    raise ValueError(
                        f"reader state of old rank {r}: rows_emitted={done[r]} outside [0, {total}]"
                    )
                pieces += _remainder(plan, done[r])
            remaining = pieces
        plan = self._rank_plan(epoch, len(levels), remaining, world_size, rank)
        if mine:
            self._plan_cache = ((epoch, levels), plan)
        return plan

    def _rank_plan(self, epoch: int, depth: int, remaining: list | None, world_size: int, rank: int):
        if remaining is None:  # an ordinary epoch: the rank's own units
            units = self.units if (world_size, rank) == (self.world_size, self.rank) else None
            return self._pack(units or shard_units(self.ds.units, world_size, rank), (self.seed, epoch))
        return self._pack(_share(remaining, world_size, rank), (self.seed, epoch, depth, rank))

    def _read(self, window: _Window, handles: dict[str, pq.ParquetFile]) -> pa.RecordBatch:
        parts = [
            read_unit(self.ds, s, handles)
            if isinstance(s, Unit)
            else self._read(s.window, handles).slice(s.lo, s.num_rows)
            for s in window.sources
        ]
        # One contiguous copy first: `take` on a single chunk is ~1.5x faster than on a chunked table.
        rows = parts[0] if len(parts) == 1 else _concat(parts)
        if window.key is None:
            return rows
        return rows.take(np.random.default_rng(list(window.key)).permutation(rows.num_rows))

    def _load_window(self, window: _Window) -> pa.RecordBatch:
        return self._read(window, {})

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """Yield the rest of the current epoch from the cursor (nothing if the epoch is done)."""
        bs = self.batch_size
        windows = self._plan(self.epoch, self._levels)
        starts = np.cumsum([0] + [w.num_rows for w in windows]).tolist()
        if self._rows_emitted >= starts[-1]:
            return
        first = bisect.bisect_right(starts, self._rows_emitted) - 1
        offset = self._rows_emitted - starts[first]

        # Up to `prefetch` windows after the current one are read in threads (Parquet decoding and
        # `take` release the GIL), so reading overlaps with the consumer and with each other.
        pool = (
            ThreadPoolExecutor(self.prefetch, thread_name_prefix="xdtrain-reader") if self.prefetch else None
        )
        ahead: deque[Future] = deque()  # the windows being read, in order
        nxt = first  # the next window to submit

        def top_up() -> None:
            nonlocal nxt
            while pool is not None and len(ahead) < self.prefetch and nxt < len(windows):
                ahead.append(pool.submit(self._load_window, windows[nxt]))
                nxt += 1

        pending: list[pa.RecordBatch] = []  # the head of a batch that spans a window boundary
        pending_rows = 0
        try:
            for i in range(first, len(windows)):
                top_up()
                rb = ahead.popleft().result() if pool is not None else self._load_window(windows[i])
                top_up()
                n = rb.num_rows
                while offset < n:
                    take = min(bs - pending_rows, n - offset)
                    piece = rb.slice(offset, take)
                    offset += take
                    if pending_rows == 0 and take == bs:
                        out = piece
                    else:
                        pending.append(piece)
                        pending_rows += take
                        if pending_rows < bs:
                            continue
                        out, pending, pending_rows = _concat(pending), [], 0
                    self._rows_emitted += out.num_rows
                    yield out
                offset = 0
            if pending:
                self._rows_emitted += pending_rows
                yield _concat(pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _check_version(state: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"reader state version {state.get('version')!r}, expected {STATE_VERSION}")


def _parse_levels(raw: list) -> Levels:
    try:
        return tuple((int(lv["world_size"]), tuple(int(k) for k in lv["rows"])) for lv in raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"reader state has a malformed 'elastic' entry {raw!r}") from e


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    # Dictionary columns (e.g. `domain`) from different row groups get their dictionaries unified here.
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
