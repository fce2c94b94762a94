"""One worker's named input streams: a streaming reader and exact cursor per stream, cycling, and
the model's batches.

A stream reads its rank's shard of one prepared dataset (`xdtrain.data.reader`), `batch_size //
world` rows at a time; with `sampler="domain_balanced"` it draws them, domain-balanced and with
replacement, from that shard (`xdtrain.data.sampler`). A cycling stream starts its next epoch as
soon as it runs dry; a non-cycling one reports exhaustion and the engine ends that stream's epoch
once every worker has. Batches are a function of (seed, rank, stream epoch, rows read before them), so a resumed
run draws the same negatives as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from xdtrain.data.reader import ParquetStreamReader
from xdtrain.data.sampler import BalancedSampleReader
from xdtrain.data.schemas import DataError
from xdtrain.nn.program import DEFAULT_STREAM, StreamSpec


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class Dataset:
    """A prepared dataset a stream may read: its URL and the reader's table kind (schema)."""

    url: str
    table: str = "sequences"


class Stream:
    def __init__(self, name: str, spec: StreamSpec, data: Dataset, model, *, world: int, rank: int, seed: int,
                 shuffle_buffer: int) -> None:
        self.name, self.spec, self.data, self.model = name, spec, data, model
        self.world, self.rank, self.seed = world, rank, seed + spec.seed
        self.local_batch = max(1, int(spec.batch_size) // world)
        if spec.sampler == "domain_balanced":
            self.reader = BalancedSampleReader(data.url, data.table, batch_size=self.local_batch, seed=self.seed,
                                               world_size=world, rank=rank)
        else:
            self.reader = ParquetStreamReader(data.url, data.table, batch_size=self.local_batch,
                                              shuffle_buffer=shuffle_buffer, seed=self.seed,
                                              world_size=world, rank=rank)
        self._it = None
        self._spare: dict | None = None
        # The default stream keeps the engine's original batch seeds; others mix in their name.
        self._salt = [] if name == DEFAULT_STREAM else [zlib.crc32(name.encode())]
        self._stream_kw = accepts(model.make_batch, "stream")

    @property
    def epoch(self) -> int:
        return self.reader.epoch

    def cursor(self) -> dict:
        return self.reader.state_dict()

    def restore(self, cursors: list[dict]) -> None:
        """Every old rank's cursor of this stream; another world size takes its share of the rest."""
        if len(cursors) == self.world:
            self.reader.load_state_dict(cursors[self.rank])
        else:
            self.reader.load_global_state(cursors)
        self._it = None

    def new_epoch(self) -> None:
        self.reader.set_epoch(self.reader.epoch + 1)
        self._it = None

    def _next_rows(self) -> pa.Table | None:
        if self._it is None:
            self._it = iter(self.reader)
        try:
            rb = next(self._it)
        except StopIteration:
            return None
        if self.spec.drop_last and rb.num_rows < self.local_batch:
            return None
        return pa.Table.from_batches([rb])

    def read(self) -> tuple[dict, pa.Table] | None:
        """(the model's batch, the rows it was built from), or None when a non-cycling stream ran dry."""
        cursor = self.cursor()
        rows = self._next_rows()
        if rows is None and self.spec.cycle:
            self.new_epoch()
            cursor = self.cursor()
            rows = self._next_rows()
            if rows is None:
                raise DataError(f"stream {self.name!r}: {self.data.url} gives rank {self.rank} no full batch")
        if rows is None:
            return None
        rng = np.random.default_rng(seed_of(self.seed, self.rank, cursor["epoch"], cursor["rows_emitted"],
                                            *self._salt))
        batch = self.make_batch(rows, rng)
        if self._spare is None:
            self._spare = batch
        return batch, rows

    def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict:
        if self._stream_kw:
            return self.model.make_batch(rows, rng, stream=self.name)
        return self.model.make_batch(rows, rng)

    def spare(self) -> dict:
        """A real batch for zero-weight iterations (the first one this worker read, or its first rows)."""
        if self._spare is None:
            r = ParquetStreamReader(self.data.url, self.data.table, batch_size=self.local_batch,
                                    world_size=self.world, rank=self.rank)
            self._spare = self.make_batch(pa.Table.from_batches([next(iter(r))]), np.random.default_rng(0))
        return self._spare


def accepts(fn, name: str) -> bool:
    """Whether callable `fn` takes a keyword `name` (optional hooks: `forward(step=)`, `make_batch(stream=)`)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
