"""Open a Parquet dataset at any fsspec URL and check it: files, row groups, schemas, nulls.

Opening reads footers only (cheap, even for thousands of files on object storage); the rows
themselves are checked for nulls when a row group is read (`read_unit`), and
`validate_dataset` reads everything once and reports every problem it finds.

`read_dataset` is the one way a job loads a whole table into memory: every file opened and checked
as above, every row group read and null-checked, string ids hashed to int64 (`hash_id_columns`).
`drop_duplicates` applies the `data.duplicates` policy to what it read.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from xdtrain.data.schemas import TABLES, DataError, check_schema, hash_id_columns

PARQUET_SUFFIXES = (".parquet", ".parq")
DUPLICATE_POLICIES = ("drop", "keep", "error")


@dataclass(frozen=True)
class Unit:
    """One row group of one file: the unit of sharding and shuffling."""

    path: str
    row_group: int
    num_rows: int


@dataclass
class Dataset:
    """An opened dataset: its files' footers, units in canonical order, and the projected schema."""

    url: str
    table: str
    fs: Any  # the fsspec filesystem
    arrow_fs: pafs.FileSystem  # the same storage seen by pyarrow's native readers
    files: list[str]
    metadata: dict[str, pq.FileMetaData]
    units: list[Unit]
    schema: pa.Schema  # projected columns, types as in the first file

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


@dataclass
class ValidationReport:
    url: str
    table: str
    files: int = 0
    row_groups: int = 0
    rows: int = 0
    null_counts: dict[str, int] = field(default_factory=dict)  # nullable columns only
    errors: list[str] = field(default_factory=list)


def list_files(url: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """The fsspec filesystem and the sorted Parquet files at `url`: one file, a directory (searched
    recursively) or a glob pattern such as `s3://bucket/logs/part-*.parquet`.

    Names starting with '.' or '_' (files or folders) are skipped: they are temporary files of an
    atomic write in progress or markers such as `_SUCCESS`, never finished data. Any other file must
    be Parquet (by its suffix): a stray file (a README.txt, a CSV) is an error rather than skipped,
    since a data file without the suffix would otherwise be dropped without a word.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if any(c in path for c in "*?["):
        found = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"]
        root = ""
    elif fs.isfile(path):
        return fs, [path]
    elif fs.isdir(path):
        found, root = fs.find(path), path.rstrip("/")
    else:
        raise DataError(f"{url}: no such file or directory")
    files = []
    for p in found:
        parts = p[len(root) :].strip("/").split("/") if root else [p.rstrip("/").rsplit("/", 1)[-1]]
        if any(q.startswith((".", "_")) for q in parts):
            continue
        if not parts[-1].endswith(PARQUET_SUFFIXES):
            raise DataError(f"{p}: not a Parquet file (a dataset holds only {' / '.join(PARQUET_SUFFIXES)} "
                            "files; move it out, or start its name with '_' or '.' to have it skipped)")
        files.append(p)
    if not files:
        raise DataError(f"{url}: empty dataset, no Parquet files found")
    return fs, sorted(files)


def _arrow_fs(fs: Any) -> pafs.FileSystem:
    # Local files go through pyarrow's native reader (no GIL, no Python I/O); others via fsspec.
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def read_footer(arrow_fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    """The Parquet footer of `path`; an empty, unreadable or truncated file raises DataError naming it."""
    try:
        with arrow_fs.open_input_file(path) as f:
            if f.size() == 0:
                raise DataError(f"{path}: empty file (0 bytes), not a Parquet file")
            return pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: unreadable Parquet file ({_one_line(e)})") from e


def open_dataset(
    url: str, table: str, columns: list[str] | None = None, storage_options: dict | None = None,
    optional: tuple[str, ...] | list[str] = (),
) -> Dataset:
    """List files, read every footer, check each file's schema against `table`, build the units.

    All files must agree on the types of the projected columns (all columns when `columns` is None;
    with `columns`, also those of `optional` that the first file has), since row groups of different
    files are concatenated inside one shuffle window.
    """
    if table not in TABLES:
        raise DataError(f"unknown table kind {table!r}; expected one of {sorted(TABLES)}")
    fs, files = list_files(url, storage_options)
    arrow_fs = _arrow_fs(fs)
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(lambda p: read_footer(arrow_fs, p), files))
    metadata = dict(zip(files, footers))
    if columns is not None:
        first = footers[0].schema.to_arrow_schema().names
        columns = list(columns) + [c for c in optional if c in first and c not in columns]

    ref_schema: pa.Schema | None = None
    ref_file = ""
    for path, md in metadata.items():
        schema = md.schema.to_arrow_schema()
        check_schema(schema, table, path)
        names = columns if columns is not None else schema.names
        for name in names:
            if name not in schema.names:
                raise DataError(f"{path}: missing column '{name}' (found columns: {', '.join(schema.names)})")
        projected = pa.schema([schema.field(n) for n in names])
        if ref_schema is None:
            ref_schema, ref_file = projected, path
            continue
        if projected.names != ref_schema.names:
            raise DataError(f"{path}: columns {projected.names} differ from {ref_file}: {ref_schema.names}")
        for f_ref, f in zip(ref_schema, projected):
            if f.type != f_ref.type:
                raise DataError(
                    f"{path}: column '{f.name}' has type {f.type}, but {f_ref.type} in {ref_file}; "
                    "all files of a dataset must use the same types"
                )
    assert ref_schema is not None

    units = [
        Unit(path, rg, md.row_group(rg).num_rows)
        for path, md in metadata.items()
        for rg in range(md.num_row_groups)
        if md.row_group(rg).num_rows > 0
    ]
    if not units:
        raise DataError(f"{url}: empty dataset, {len(files)} Parquet file(s) but zero rows")
    return Dataset(url, table, fs, arrow_fs, files, metadata, units, ref_schema)


def list_units(url: str, table: str = "interactions", storage_options: dict | None = None) -> list[Unit]:
    """Every (file, row group) of the dataset in canonical order (sorted files, row groups ascending)."""
    return open_dataset(url, table, storage_options=storage_options).units


def check_nulls(batch: pa.RecordBatch, table: str, where: str, row_offset: int = 0) -> None:
    """No nulls in the non-nullable columns of `table` that `batch` carries (a projection may omit some)."""
    for col in TABLES[table]:
        if col.nullable or col.name not in batch.schema.names:
            continue
        arr = batch.column(col.name)
        if arr.null_count:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise DataError(
                f"{where}: column '{col.name}' has {arr.null_count} null value(s) "
                f"(first at row {row_offset + first})"
            )


def read_unit(ds: Dataset, unit: Unit, handles: dict[str, pq.ParquetFile] | None = None) -> pa.RecordBatch:
    """Read one row group (projected columns) as a single RecordBatch and check it for nulls.

    `handles` caches open files so that the row groups of one file share one handle and footer.
    Errors name the file and row group; the null check names the row within the file.
    """
    where = f"{unit.path} (row group {unit.row_group})"
    try:
        pf = handles.get(unit.path) if handles is not None else None
        if pf is None:
            pf = pq.ParquetFile(ds.arrow_fs.open_input_file(unit.path), metadata=ds.metadata[unit.path])
            if handles is not None:
                handles[unit.path] = pf
        t = pf.read_row_group(unit.row_group, columns=ds.schema.names, use_threads=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{where}: unreadable row group ({_one_line(e)})") from e
    if t.num_rows != unit.num_rows:
        raise DataError(f"{where}: read {t.num_rows} rows, footer says {unit.num_rows}")
    if t.schema != ds.schema:  # same types (checked at open), other field metadata / nullability flags
        t = pa.Table.from_arrays(t.columns, schema=ds.schema)
    rb = t.combine_chunks().to_batches()[0]  # one chunk per column after combine: exactly one batch
    md = ds.metadata[unit.path]
    start = sum(md.row_group(i).num_rows for i in range(unit.row_group))
    check_nulls(rb, ds.table, where, row_offset=start)
    return rb


def validate_dataset(
    url: str, table: str = "interactions", storage_options: dict | None = None, raise_errors: bool = True
) -> ValidationReport:
    """Read the whole dataset once and report files, row groups, rows and every problem found.

    Footer and schema problems stop the scan (they make the dataset unusable as a whole); row-group
    problems (unreadable pages, nulls) are collected for every row group. With `raise_errors`, any
    problem raises one DataError listing them all; otherwise they are returned in `report.errors`.
    """
    report = ValidationReport(url, table)
    try:
        ds = open_dataset(url, table, storage_options=storage_options)
    except DataError as e:
        if raise_errors:
            raise
        report.errors.append(str(e))
        return report
    report.files, report.row_groups, report.rows = len(ds.files), len(ds.units), ds.num_rows
    nullable = [c.name for c in TABLES[table] if c.nullable and c.name in ds.schema.names]
    report.null_counts = dict.fromkeys(nullable, 0)
    for unit in ds.units:
        try:
            rb = read_unit(ds, unit)
        except DataError as e:
            report.errors.append(str(e))
            continue
        for name in nullable:
            report.null_counts[name] += rb.column(name).null_count
    if raise_errors and report.errors:
        shown = "\n  ".join(report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise DataError(f"{url}: {len(report.errors)} problem(s) in {table} dataset:\n  {shown}{more}")
    return report


def read_dataset(
    url: str, table: str, columns: list[str] | None = None, optional: tuple[str, ...] | list[str] = (),
    storage_options: dict | None = None,
) -> tuple[Dataset, pa.Table]:
    """The whole dataset in memory, checked: files, footers and schemas (`open_dataset`), every row
    group read and null-checked (`read_unit`), and string ids hashed to int64 (`hash_id_columns`).

    `columns` (default: all) must be in every file; those of `optional` are read where the first file
    has them. Every problem raises a one-line DataError naming the file (row group, column, row).
    """
    ds = open_dataset(url, table, columns, storage_options, optional)
    handles: dict[str, pq.ParquetFile] = {}
    batches = [read_unit(ds, u, handles) for u in ds.units]
    return ds, hash_id_columns(pa.Table.from_batches(batches, schema=ds.schema), table)


def row_origin(ds: Dataset, row: int) -> str:
    """Where row `row` of `read_dataset`'s table comes from: '<file> row <n>' (n counted in the file)."""
    for unit in ds.units:
        if row < unit.num_rows:
            md = ds.metadata[unit.path]
            return f"{unit.path} row {sum(md.row_group(i).num_rows for i in range(unit.row_group)) + row}"
        row -= unit.num_rows
    raise IndexError(f"row beyond the {ds.num_rows} rows of {ds.url}")


def drop_duplicates(
    data: pa.Table, policy: str, where: str, origin: Callable[[int], str] | None = None
) -> tuple[pa.Table, int]:
    """Apply the duplicate policy to rows equal in every column (`data.duplicates`): (rows, duplicates).

    `drop` keeps the first of each set of equal rows (in input order), `keep` keeps them all, `error`
    raises a DataError naming the first repeat (`origin(row)` says where a row came from). Either way
    the number of repeated rows is returned.
    """
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"data.duplicates: unknown policy {policy!r}; expected one of {list(DUPLICATE_POLICIES)}")
    n = data.num_rows
    if n < 2:
        return data, 0
    rows = data.append_column("__row", pa.array(np.arange(n, dtype=np.int64)))
    firsts = np.sort(rows.group_by(data.column_names).aggregate([("__row", "min")])["__row_min"].to_numpy())
    dups = n - len(firsts)
    if dups == 0 or policy == "keep":
        return data, dups
    if policy == "error":
        repeat = np.ones(n, dtype=bool)
        repeat[firsts] = False
        first = int(np.argmax(repeat))
        at = origin(first) if origin is not None else f"row {first}"
        raise DataError(f"{where}: {dups} exact duplicate row(s), the first at {at} "
                        "(data.duplicates=error; 'drop' keeps one of each)")
    return data.take(pa.array(firsts)), dups
