"""Batch inference of one vector table from a checkpoint, and its bucketed Parquet output.

    src = ExportSource(model_spec, model_data, checkpoint)       # what every worker rebuilds
    batches = infer_ray(src, "user", ray.data.read_parquet(users), workers=2, batch_size=8192)
    meta = write_buckets(batches, table_url, "user", buckets=4)

`infer_ray` runs the model's `export_part` on a Ray Data actor pool: each actor builds the model,
loads the checkpoint's dense weights and restores its PS tables into an in-process PS once, then
embeds batch after batch. `infer_local` is the same work in this process (the single-process
baseline of bench/refresh_bench.py). `write_buckets` spreads the rows over bucket files by id hash
(xdtrain/serving/store.py), each written atomically, and writes the table manifest last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xdtrain.config import ConfigError
from xdtrain.models import ModelData, build_model
from xdtrain.nn.sparse import ExportsParts
from xdtrain.outputs import AtomicFile, resolve, write_json_atomic
from xdtrain.ps import LocalPS, OptimizerSpec, TableSpec
from xdtrain.ps.checkpoint import read_manifest
from xdtrain.ps.export import write_export_manifest
from xdtrain.serving import store
from xdtrain.serving.store import bucket_of, part_name
from xdtrain.train import checkpointing as ck

ROW_GROUP_ROWS = 1 << 16


@dataclass
class ExportSource:
    """Everything a worker needs to rebuild the checkpoint's model (picklable, shipped once per actor)."""

    model: dict  # the config's `model:` section
    data: ModelData
    checkpoint: str
    seed: int = 0
    threads: int = 1  # torch threads per worker


def export_model(src: ExportSource) -> torch.nn.Module:
    """The checkpoint's model with its dense weights, in eval mode (no PS: enough for `export_keys`)."""
    model = build_model(src.model, src.data, src.seed)
    if not isinstance(model, ExportsParts):
        raise ConfigError(f"refresh: model {src.model.get('name')!r} has no export_keys/export_part hooks "
                          "(xdtrain/nn/sparse.py); the refresh job computes vectors through them")
    ck.load_dense(src.checkpoint, model)
    return model.eval()


def load_ps(checkpoint: str, specs: list[TableSpec]) -> LocalPS:
    """The checkpoint's rows of the model's tables (`specs`) in an in-process PS. They are only read,
    so each table is declared with plain SGD: no optimizer state is restored or allocated (Adam's
    two moments would triple the memory of a 10^7-row table)."""
    url = ck.ps_url(checkpoint)
    ps = LocalPS(1, read_manifest(url)["num_slots"])
    for spec in specs:
        ps.create_table(replace(spec, optimizer=OptimizerSpec("sgd", lr=1.0)))
    ps.restore(url, optimizer_state=False)
    return ps


def load_model(src: ExportSource) -> tuple[torch.nn.Module, LocalPS]:
    model = export_model(src)
    return model, load_ps(src.checkpoint, model.sparse_tables())


class ExportWorker:
    """A Ray Data actor: one model per actor, `export_part(name, batch)` per batch."""

    def __init__(self, src: ExportSource, name: str) -> None:
        torch.set_num_threads(max(1, src.threads))
        self.model, self.ps = load_model(src)
        self.name = name

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.no_grad():
            return self.model.export_part(self.name, batch, self.ps.pull)


def infer_ray(src: ExportSource, name: str, rows, workers: int, batch_size: int) -> Iterator[pa.Table]:
    """The vectors of table `name` for the rows of Ray Dataset `rows`, from `workers` actors, as batches."""
    import ray.data

    out = rows.map_batches(ExportWorker, fn_constructor_kwargs={"src": src, "name": name},
                           compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size,
                           batch_format="pyarrow", num_cpus=1)
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])


def infer_local(src: ExportSource, name: str, rows: Iterable[pa.Table], batch_size: int,
                loaded: tuple[torch.nn.Module, LocalPS] | None = None) -> Iterator[pa.Table]:
    """As `infer_ray`, one batch after another in this process (`loaded`: a model and PS already built)."""
    model, ps = loaded or load_model(src)
    for part in rows:
        for a in range(0, part.num_rows, batch_size):
            with torch.no_grad():
                yield model.export_part(name, part.slice(a, batch_size), ps.pull)


def dataset_rows(url: str) -> int:
    """Rows of a Parquet dataset (file or folder), from the footers."""
    fs, path = resolve(url)
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    total = 0
    for p in files:
        with fs.open(p, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def num_buckets(rows: int, rows_per_bucket: int) -> int:
    return max(1, -(-int(rows) // max(1, int(rows_per_bucket))))


class _BucketWriter:
    """One bucket file: rows buffered to whole row groups, written under a temporary name."""

    def __init__(self, path: str, fs) -> None:
        self.atomic, self.writer, self.buf, self.rows = AtomicFile(path, fs), None, [], 0
        self.pending = 0

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.pending += table.num_rows
        if self.pending >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        table = pa.concat_tables(self.buf)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.atomic.file, table.schema)
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows
        self.buf, self.pending = [], 0

    def close(self, schema: pa.Schema) -> int:
        self.flush()
        if self.writer is None:  # an empty bucket: a file with the table's schema and no rows
            self.writer = pq.ParquetWriter(self.atomic.file, schema)
        self.writer.close()
        self.atomic.commit()
        return self.rows

    def discard(self) -> None:
        self.atomic.discard()


def write_buckets(batches: Iterable[pa.Table], url: str, name: str, buckets: int) -> dict:
    """Write the vector batches (id, vector[, domain]) under `url` as `buckets` files by id hash, then
    the manifest; returns {rows, dim, buckets, files}. An error leaves no manifest (and no part files)."""
    fs, root = resolve(url)
    fs.makedirs(root, exist_ok=True)
    writers = [_BucketWriter(f"{root}/{part_name(b)}", fs) for b in range(buckets)]
    schema, dim = None, 0
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            schema = schema or batch.schema
            dim = dim or batch.schema.field("vector").type.list_size
            which = bucket_of(np.asarray(batch.column("id").to_numpy()), buckets)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                writers[b].add(batch.take(order[bounds[b]:bounds[b + 1]]))
        if schema is None:
            raise ConfigError(f"refresh: table {name!r} has no rows to write (empty source)")
        files = [{"path": part_name(b), "rows": w.close(schema)} for b, w in enumerate(writers)]
    except BaseException:
        for w in writers:
            w.discard()
        raise
    write_export_manifest(url, name, dim, files)
    return {"rows": sum(f["rows"] for f in files), "dim": dim, "buckets": buckets, "files": files,
            "columns": schema.names}


def table_slices(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` in slices of at most `rows` rows (blocks of a Ray Dataset built from it)."""
    return [table.slice(a, rows) for a in range(0, max(table.num_rows, 1), max(1, rows))]


def parquet_batches(url: str, batch_size: int) -> Iterator[pa.Table]:
    """The rows of a Parquet file or folder (any fsspec URL), `batch_size` rows at a time."""
    fs, path = resolve(url)
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    for p in files:
        with fs.open(p, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                yield pa.Table.from_batches([batch])


def write_version(out: str, version: str, tables: dict[str, pa.Table], buckets: int = 4,
                  keys: dict[str, list[str]] | None = None, publish: bool = True) -> dict:
    """A finished version of given vector tables (id, vector[, domain]) under the store `out`, without
    a model or checks (fixtures and benchmarks of the reader); published when `publish`. `keys`: a
    table's key columns (default ["id"])."""
    fs, _ = resolve(out)
    metas = {n: write_buckets(iter(table_slices(t, ROW_GROUP_ROWS)), store.table_dir(out, version, n), n, buckets)
             for n, t in tables.items()}
    info = {"version": version, "checkpoint": "", "step": None, "checks": [],
            "tables": {n: {"rows": m["rows"], "dim": m["dim"], "buckets": m["buckets"],
                           "keys": (keys or {}).get(n, ["id"])} for n, m in metas.items()}}
    write_json_atomic(f"{store.version_dir(out, version)}/{store.VERSION_FILE}", info, fs)
    if publish:
        store.publish(out, version, info)
    return info
