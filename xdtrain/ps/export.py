"""Tables as Parquet (id: int64, vector: fixed_size_list<float32>): export for embedding refresh,
and the validated reader `read_vectors` that `import_table` loads rows from.

Each shard writes its own files, in row groups of bounded size, under temporary names that are
renamed when complete; the client writes `_MANIFEST.json` (files, row counts, dim) last. A reader
takes the manifest as the sign that the export is whole, and reads only the files it lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.outputs import AtomicFile, write_json_atomic
from xdtrain.ps.checkpoint import url_to_fs
from xdtrain.ps.table import ShardTable

EXPORT_MANIFEST = "_MANIFEST.json"
_ROW_GROUP_ROWS = 1 << 16


def export_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])


def _batch(ids: np.ndarray, rows: np.ndarray) -> pa.RecordBatch:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    vec = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])
    return pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), vec], names=["id", "vector"])


def write_shard_export(url: str, table: ShardTable, shard: int, rows_per_file: int) -> list[dict]:
    """Write this shard's rows of `table` as Parquet files under `url`; returns [{path, rows}]."""
    fs, root = url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    cols = table.columns()
    ids, rows = cols["ids"], cols["rows"]
    schema = export_schema(table.spec.dim)
    files: list[dict] = []
    starts = range(0, max(len(ids), 1), max(int(rows_per_file), 1))
    for part, start in enumerate(starts):
        stop = min(start + rows_per_file, len(ids))
        name = f"{table.spec.name}-shard{shard:05d}-{part:05d}.parquet"
        with AtomicFile(f"{root}/{name}", fs) as f, pq.ParquetWriter(f, schema) as writer:
            for a in range(start, stop, _ROW_GROUP_ROWS):
                b = min(a + _ROW_GROUP_ROWS, stop)
                writer.write_batch(_batch(ids[a:b], rows[a:b]))
        files.append({"path": name, "rows": int(stop - start)})
    return files


def write_export_manifest(url: str, table: str, dim: int, files: list[dict]) -> str:
    fs, root = url_to_fs(url)
    path = f"{root}/{EXPORT_MANIFEST}"
    body = {"table": table, "dim": dim, "rows": sum(f["rows"] for f in files), "files": files}
    return write_json_atomic(path, body, fs, indent=1)


def read_export(url: str) -> pa.Table:
    """Read a finished export (only the files its manifest lists); raises if there is no manifest."""
    fs, root = url_to_fs(url)
    path = f"{root}/{EXPORT_MANIFEST}"
    if not fs.exists(path):
        raise FileNotFoundError(f"{path}: no export manifest (export missing or incomplete)")
    with fs.open(path, "rb") as f:
        manifest = json.loads(f.read().decode())
    parts = []
    for entry in manifest["files"]:
        with fs.open(f"{root}/{entry['path']}", "rb") as f:
            parts.append(pq.read_table(f))
    return pa.concat_tables(parts) if parts else export_schema(manifest["dim"]).empty_table()


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def vector_files(url: str) -> list[str]:
    """The Parquet files at `url`: those an export's manifest lists, a directory's *.parquet files
    (hidden and temporary ones skipped), or the file itself."""
    fs, root = url_to_fs(url)
    manifest = f"{root}/{EXPORT_MANIFEST}"
    if fs.exists(manifest):
        with fs.open(manifest, "rb") as f:
            return [f"{root}/{e['path']}" for e in json.loads(f.read().decode())["files"]]
    if fs.isdir(root):
        names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
        files = [p for p in names if not p.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))]
        if not files:
            raise DataError(f"{url}: no .parquet files to import")
        return files
    if not fs.exists(root):
        raise DataError(f"{url}: no such file or directory to import")
    return [root]


def _vector_batch(batch: pa.RecordBatch, dim: int, where: str, id_col: str, vec_col: str, row0: int):
    """(int64 ids, float32 (n, dim) rows) of one record batch, or DataError naming the row."""
    ids_arr, vec = batch.column(0), batch.column(1)
    if ids_arr.null_count:
        raise DataError(f"{where}: column {id_col!r} row {row0 + _first(ids_arr.is_null().to_numpy(False))} is null")
    try:
        ids = pc.cast(ids_arr, pa.int64()).to_numpy()
    except pa.ArrowInvalid as e:
        raise DataError(f"{where}: column {id_col!r}: ids do not fit int64 ({e})") from None
    if vec.null_count:
        raise DataError(f"{where}: column {vec_col!r} row {row0 + _first(vec.is_null().to_numpy(False))} is null")
    lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
    if (lengths != dim).any():
        i = _first(lengths != dim)
        raise DataError(f"{where}: column {vec_col!r} row {row0 + i} has {lengths[i]} values, the table has dim {dim}")
    values = vec.flatten()
    if values.null_count:
        i = _first(values.is_null().to_numpy(False)) // dim
        raise DataError(f"{where}: column {vec_col!r} row {row0 + i} has a null value")
    rows = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(ids), dim)
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: column {vec_col!r} row {row0 + _first(bad)} has a NaN or infinite value")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{where}: column {id_col!r}: id {int(uniq[counts > 1][0])} appears more than once")
    return ids, rows


def read_vectors(
    url: str, dim: int, id_column: str = "id", vector_column: str = "vector", batch_rows: int = 1 << 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids int64, rows float32 (n, dim)) in batches from Parquet with an integer id column and a
    list / fixed-size-list float vector column (an `export`, a directory of files, or one file).

    DataError names the file, column and row (counted from 0 in its file) of a null, a vector of
    another length, a NaN, or an id repeated within a batch.
    """
    fs, _ = url_to_fs(url)
    for path in vector_files(url):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            for col in (id_column, vector_column):
                if col not in schema.names:
                    raise DataError(f"{path}: no column {col!r} (columns: {schema.names})")
            id_t, vec_t = schema.field(id_column).type, schema.field(vector_column).type
            if not pa.types.is_integer(id_t):
                raise DataError(f"{path}: column {id_column!r} must hold integer ids, it is {id_t}")
            is_list = pa.types.is_list(vec_t) or pa.types.is_large_list(vec_t) or pa.types.is_fixed_size_list(vec_t)
            if not is_list or not pa.types.is_floating(vec_t.value_type):
                raise DataError(f"{path}: column {vector_column!r} must be a list of floats, it is {vec_t}")
            row0 = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=[id_column, vector_column]):
                yield _vector_batch(batch, dim, path, id_column, vector_column, row0)
                row0 += batch.num_rows


def write_vector_table(url: str, name: str, table: pa.Table) -> str:
    """Write a vector table (id, vector: fixed_size_list<float32>, any other columns) under `url` in
    the layout of `export` (one Parquet file, then the manifest), so `read_export` and
    `import_table` read it; returns the manifest path."""
    vec = table.schema.field("vector").type if "vector" in table.column_names else None
    if "id" not in table.column_names or vec is None or not pa.types.is_fixed_size_list(vec):
        raise ValueError(f"{name}: a vector table needs an 'id' and a fixed-size-list 'vector' column, "
                         f"got {table.schema}")
    fs, root = url_to_fs(url)
    if fs.exists(f"{root}/{EXPORT_MANIFEST}"):
        raise FileExistsError(f"{url}: an export is already there; export to a fresh URL")
    fs.makedirs(root, exist_ok=True)
    fname = f"{name}-00000.parquet"
    with AtomicFile(f"{root}/{fname}", fs) as f:
        pq.write_table(table, f, row_group_size=_ROW_GROUP_ROWS)
    return write_export_manifest(url, name, vec.list_size, [{"path": fname, "rows": table.num_rows}])
