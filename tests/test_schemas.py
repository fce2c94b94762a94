"""Canonical schemas: type checks and null checks name the file, column and row; id hashing is stable."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from xdtrain.data.schemas import DataError, check_batch, check_schema, hash_ids


def test_missing_column_is_named():
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    with pytest.raises(DataError, match=r"f\.parquet: missing required column 'domain' for interactions"):
        check_schema(schema, "interactions", "f.parquet")


def test_wrong_type_is_named():
    schema = pa.schema(
        [("user_id", pa.float64()), ("item_id", pa.int64()), ("domain", pa.string()), ("timestamp", pa.int64())]
    )
    with pytest.raises(DataError, match=r"column 'user_id' has type double, expected id for interactions"):
        check_schema(schema, "interactions", "f.parquet")


def test_string_and_int_ids_are_both_accepted():
    for id_type in (pa.int64(), pa.string(), pa.int32()):
        schema = pa.schema([("head", id_type), ("relation", pa.int32()), ("tail", id_type)])
        check_schema(schema, "triplets", "t.parquet")


def test_null_in_key_column_names_first_row():
    batch = pa.table({"user_id": [1, 2, None, None], "item_id": [1, 2, 3, 4], "domain": ["a"] * 4,
                      "timestamp": [0, 1, 2, 3]})
    with pytest.raises(DataError, match=r"column 'user_id' has 2 null value\(s\) \(first at row 12\)"):
        check_batch(batch, "interactions", "f.parquet", row_offset=10)


def test_nullable_columns_may_hold_nulls():
    batch = pa.table({"item_id": [1, 2], "domain": ["a", "b"], "text": ["x", None]})
    check_batch(batch, "items", "items.parquet")


def test_hash_ids_is_stable_and_passes_ints_through():
    assert hash_ids(pa.array([5, 7], pa.int64())).tolist() == [5, 7]
    h = hash_ids(["u1", "u2", "u1"])
    assert h.dtype == np.int64 and h[0] == h[2] != h[1] and (h >= 0).all()
    # FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; masked to 63 bits:
    assert hash_ids(["a"])[0] == 0xAF63DC4C8601EC8C & ((1 << 63) - 1)
