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
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.data.validate import Unit, list_units, open_dataset, read_unit

__all__ = ["ParquetStreamReader", "Unit", "list_units", "shard_units"]

STATE_VERSION = 1


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
        self._rows_emitted = 0  # rows of `epoch` already yielded by this rank

    @property
    def schema(self) -> pa.Schema:
        return self.ds.schema

    def num_rows(self) -> int:
        """Rows in this rank's shard per epoch (from footers; the same every epoch)."""
        return sum(u.num_rows for u in self.units)

    def __len__(self) -> int:
        """Batches per epoch (the last may be short)."""
        return -(-self.num_rows() // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; the current epoch keeps its cursor, so a restored reader resumes."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._rows_emitted = epoch, 0

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
        """A JSON-able cursor: the epoch and the rows of it this rank has yielded so far."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "rows_emitted": self._rows_emitted,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output; the next iteration yields exactly the rows not yet yielded.

        The reader must be built with the same dataset, seed, shuffle_buffer, world_size and rank
        (batch_size may differ); anything else raises ValueError naming the mismatch.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, ours in self._fingerprint().items():
            if state.get(key) != ours:
                raise ValueError(f"reader state has {key}={state.get(key)!r} but this reader has {ours!r}")
        rows = int(state["rows_emitted"])
        if not 0 <= rows <= self.num_rows():
            raise ValueError(f"reader state rows_emitted={rows} outside [0, {self.num_rows()}]")
        self.epoch, self._rows_emitted = int(state["epoch"]), rows

    # --- plan and read ------------------------------------------------------------------------

    def windows(self, epoch: int) -> list[list[Unit]]:
        """The epoch's windows: the rank's units in visiting order, packed up to `shuffle_buffer` rows."""
        if self.shuffle_buffer == 0:
            return [[u] for u in self.units]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        out: list[list[Unit]] = []
        rows = 0
        for i in order:
            u = self.units[i]
            if out and rows + u.num_rows <= self.shuffle_buffer:
                out[-1].append(u)
                rows += u.num_rows
            else:
                out.append([u])
                rows = u.num_rows
        return out

    def _load_window(self, epoch: int, index: int, units: list[Unit]) -> pa.RecordBatch:
        handles: dict[str, pq.ParquetFile] = {}
        parts = [read_unit(self.ds, u, handles) for u in units]
        # One contiguous copy first: `take` on a single chunk is ~1.5x faster than on a chunked table.
        window = parts[0] if len(parts) == 1 else _concat(parts)
        if self.shuffle_buffer == 0:
            return window
        return window.take(np.random.default_rng([self.seed, epoch, index]).permutation(window.num_rows))

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """Yield the rest of the current epoch from the cursor (nothing if the epoch is done)."""
        epoch, bs = self.epoch, self.batch_size
        windows = self.windows(epoch)
        starts = np.cumsum([0] + [sum(u.num_rows for u in w) for w in windows]).tolist()
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
                ahead.append(pool.submit(self._load_window, epoch, nxt, windows[nxt]))
                nxt += 1

        pending: list[pa.RecordBatch] = []  # the head of a batch that spans a window boundary
        pending_rows = 0
        try:
            for i in range(first, len(windows)):
                top_up()
                rb = ahead.popleft().result() if pool is not None else self._load_window(epoch, i, windows[i])
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


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    # Dictionary columns (e.g. `domain`) from different row groups get their dictionaries unified here.
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
