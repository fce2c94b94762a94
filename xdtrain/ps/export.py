"""Stream a table out as Parquet (id: int64, vector: fixed_size_list<float32>) for embedding refresh.

Each shard writes its own files, in row groups of bounded size, under temporary names that are
renamed when complete; the client writes `_MANIFEST.json` (files, row counts, dim) last. A reader
takes the manifest as the sign that the export is whole, and reads only the files it lists.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
