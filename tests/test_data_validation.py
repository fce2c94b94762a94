"""Bad datasets stop with one DataError naming the file (and row group / column / row); nothing is dropped.

Schemas are checked when the reader opens a dataset (footers only); nulls when a row group is read;
`validate_dataset` reads everything and lists every problem.
"""

from __future__ import annotations

import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.data.reader import ParquetStreamReader
from xdtrain.data.schemas import DataError
from xdtrain.data.validate import validate_dataset


def interactions(start: int, n: int, **override) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    cols = {
        "user_id": ids,
        "item_id": ids % 7,
        "domain": pa.array(["movies"] * n, pa.string()),
        "timestamp": ids * 10,
    }
    cols.update(override)
    return pa.table(cols)


def write(path, table: pa.Table, row_group: int = 50) -> str:
    pq.write_table(table, str(path), row_group_size=row_group, compression="zstd")
    return str(path)


@pytest.fixture
def good(tmp_path):
    """Two valid files of 120 rows each (row groups of 50)."""
    d = tmp_path / "log"
    d.mkdir()
    write(d / "part-0.parquet", interactions(0, 120))
    write(d / "part-1.parquet", interactions(120, 120))
    return d


def test_good_dataset_report(good):
    report = validate_dataset(str(good), "interactions")
    assert (report.files, report.row_groups, report.rows, report.errors) == (2, 6, 240, [])


def test_rating_nulls_are_allowed_and_counted(tmp_path):
    write(tmp_path / "r.parquet", interactions(0, 10, rating=[1.0, None, 3.0, None] + [5.0] * 6))
    report = validate_dataset(str(tmp_path), "interactions")
    assert report.null_counts == {"rating": 2} and report.rows == 10


def test_missing_column_names_the_file(good):
    bad = write(good / "part-2.parquet", interactions(240, 10).drop_columns(["domain"]))
    msg = rf"{re.escape(bad)}: missing required column 'domain' for interactions"
    with pytest.raises(DataError, match=msg):
        ParquetStreamReader(str(good))  # refused at open: nothing is yielded from a bad dataset
    with pytest.raises(DataError, match=msg):
        validate_dataset(str(good))


def test_wrong_type_names_file_and_column(good):
    bad = write(good / "part-2.parquet", interactions(240, 10, timestamp=["late"] * 10))
    with pytest.raises(
        DataError, match=rf"{re.escape(bad)}: column 'timestamp' has type string, expected int or float"
    ):
        ParquetStreamReader(str(good))


def test_types_must_agree_across_files(good):
    bad = write(good / "part-2.parquet", interactions(240, 10, user_id=[f"u{i}" for i in range(10)]))
    with pytest.raises(
        DataError,
        match=rf"{re.escape(bad)}: column 'user_id' has type string, but int64 in .*part-0\.parquet",
    ):
        ParquetStreamReader(str(good))


def test_projected_column_must_exist(good):
    with pytest.raises(DataError, match=r"part-0\.parquet: missing column 'rating' \(found columns: user_id"):
        ParquetStreamReader(str(good), columns=["user_id", "rating"])


def test_null_in_key_column_names_file_row_group_column_and_row(good):
    user = list(range(240, 400))
    user[123] = None  # row 123 of the file = row 23 of row group 2
    user[140] = None
    bad = write(good / "part-2.parquet", interactions(240, 160, user_id=pa.array(user, pa.int64())))
    msg = rf"{re.escape(bad)} \(row group 2\): column 'user_id' has 2 null value\(s\) \(first at row 123\)"
    reader = ParquetStreamReader(str(good), batch_size=20)  # footers are fine: open succeeds
    seen = 0
    with pytest.raises(DataError, match=msg):
        for b in reader:
            seen += b.num_rows
    assert seen == 240 + 100  # every full batch before the bad row group was yielded, nothing after
    with pytest.raises(DataError, match=msg):
        validate_dataset(str(good))


def test_truncated_file_is_named(good):
    src = (good / "part-1.parquet").read_bytes()
    (good / "part-1.parquet").write_bytes(src[: len(src) // 2])
    msg = rf"{re.escape(str(good / 'part-1.parquet'))}: unreadable Parquet file \("
    with pytest.raises(DataError, match=msg):
        ParquetStreamReader(str(good))
    with pytest.raises(DataError, match=msg):
        validate_dataset(str(good))


def test_not_parquet_is_named(good):
    (good / "part-2.parquet").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"part-2\.parquet: unreadable Parquet file \("):
        ParquetStreamReader(str(good))


def test_corrupt_page_names_the_row_group(good):
    path = good / "part-1.parquet"
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[page + 20 : page + 50] = b"\xff" * 30  # a damaged page; the footer is intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part-1\.parquet \(row group 1\): unreadable row group \("):
        list(ParquetStreamReader(str(good)))
    report = validate_dataset(str(good), raise_errors=False)
    assert len(report.errors) == 1 and "part-1.parquet (row group 1)" in report.errors[0]


def test_validate_lists_every_bad_row_group(good):
    for f, start in ((2, 240), (3, 400)):
        user = pa.array([None] + list(range(start + 1, start + 60)), pa.int64())
        write(good / f"part-{f}.parquet", interactions(start, 60, user_id=user))
    with pytest.raises(DataError, match=r"2 problem\(s\) in interactions dataset:") as err:
        validate_dataset(str(good))
    assert "part-2.parquet (row group 0)" in str(err.value) and "part-3.parquet (row group 0)" in str(
        err.value
    )


def test_empty_directory(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    with pytest.raises(
        DataError, match=rf"{re.escape(str(tmp_path))}: empty dataset, no Parquet files found"
    ):
        ParquetStreamReader(str(tmp_path))


def test_a_stray_file_is_named_not_skipped(good):
    (good / "README.txt").write_text("not data")
    with pytest.raises(DataError, match=r"README\.txt: not a Parquet file"):
        ParquetStreamReader(str(good))


def test_files_with_zero_rows(tmp_path):
    write(tmp_path / "a.parquet", interactions(0, 0))
    with pytest.raises(DataError, match=r"empty dataset, 1 Parquet file\(s\) but zero rows"):
        validate_dataset(str(tmp_path))


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or directory"):
        ParquetStreamReader(str(tmp_path / "nope"))


def test_unknown_table_kind(good):
    with pytest.raises(DataError, match=r"unknown table kind 'clicks'"):
        validate_dataset(str(good), "clicks")


def test_temporary_and_marker_files_are_not_data(good):
    (good / "_SUCCESS").write_text("")
    (good / ".part-9.parquet.tmp.parquet").write_text("half written")  # an atomic write in progress
    (good / "_temporary").mkdir()
    (good / "_temporary" / "part-7.parquet").write_text("half written")
    assert validate_dataset(str(good)).files == 2


def test_nested_folders_and_globs(good):
    (good / "more").mkdir()
    write(good / "more" / "part-2.parquet", interactions(240, 30))
    assert validate_dataset(str(good)).rows == 270
    assert validate_dataset(str(good / "part-*.parquet")).rows == 240
    with pytest.raises(DataError, match=r"x-\*\.parquet: empty dataset, no Parquet files found"):
        validate_dataset(str(good / "x-*.parquet"))


def test_other_table_kinds(tmp_path):
    triplets = pa.table({"head": [1, 2], "relation": pa.array([0, 1], pa.int32()), "tail": [3, None]})
    write(tmp_path / "kg.parquet", triplets)
    with pytest.raises(DataError, match=r"kg\.parquet \(row group 0\): column 'tail' has 1 null value"):
        validate_dataset(str(tmp_path), "triplets")
    with pytest.raises(DataError, match=r"kg\.parquet: missing required column 'item_id' for items"):
        validate_dataset(str(tmp_path), "items")


def test_memory_url_errors_name_the_file():
    fs = fsspec.filesystem("memory")
    fs.makedirs("/val-bad", exist_ok=True)
    with fs.open("/val-bad/a.parquet", "wb") as f:
        pq.write_table(interactions(0, 5).drop_columns(["item_id"]), f)
    try:
        with pytest.raises(DataError, match=r"/val-bad/a\.parquet: missing required column 'item_id'"):
            ParquetStreamReader("memory://val-bad")
    finally:
        fs.rm("/val-bad", recursive=True)
