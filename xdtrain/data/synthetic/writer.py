"""Chunked Parquet output on any fsspec filesystem, never leaving a half-written file.

`ParquetSink` buffers Arrow tables and writes row groups of `row_group_rows`, starting a new
`part-NNNNN.parquet` every `rows_per_file` rows. Each file is written under a hidden
temporary name and renamed when complete. The row content and order of a dataset do not
depend on the file or row-group sizes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xdtrain.outputs import AtomicFile


class ParquetSink:
    def __init__(self, fs, directory: str, schema: pa.Schema, rows_per_file: int, row_group_rows: int,
                 compression: str = "zstd"):
        self.fs, self.dir, self.schema = fs, directory.rstrip("/"), schema
        self.rows_per_file, self.row_group_rows, self.compression = rows_per_file, row_group_rows, compression
        self.files: list[str] = []
        self.rows = 0
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._handle = None
        self._file_rows = 0
        fs.makedirs(self.dir, exist_ok=True)

    def write(self, columns: dict[str, Any]) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self._buf.append(table)
            self._buffered += table.num_rows
            self._drain(final=False)

    def close(self) -> list[str]:
        self._drain(final=True)
        if self._writer is not None:
            self._finish_file()
        if not self.files:  # an empty table still gets one (empty) file with the schema
            self._open_file()
            self._finish_file()
        return self.files

    def _drain(self, final: bool) -> None:
        while self._buffered >= self.row_group_rows or (final and self._buffered > 0):
            take = min(self.row_group_rows, self._buffered, self.rows_per_file - self._file_rows)
            table = pa.concat_tables(self._buf)
            if self._writer is None:
                self._open_file()
            self._writer.write_table(table.slice(0, take), row_group_size=take)
            rest = table.slice(take)
            self._buf, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
            self._file_rows += take
            self.rows += take
            if self._file_rows >= self.rows_per_file:
                self._finish_file()

    def _open_file(self) -> None:
        self._handle = AtomicFile(f"{self.dir}/part-{len(self.files):05d}.parquet", self.fs)
        self._writer = pq.ParquetWriter(self._handle.file, self.schema, compression=self.compression)
        self._file_rows = 0

    def _finish_file(self) -> None:
        self._writer.close()
        self._handle.commit()
        self.files.append(f"{self.dir}/part-{len(self.files):05d}.parquet")
        self._writer = self._handle = None
        self._file_rows = 0


def write_small_table(fs, path: str, columns: dict[str, Any], schema: pa.Schema, compression: str = "zstd") -> None:
    """A small single-file table, written to a temporary name and renamed."""
    with AtomicFile(path, fs) as f:
        pq.write_table(pa.Table.from_pydict(columns, schema=schema), f, compression=compression)
