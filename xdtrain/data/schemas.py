"""Arrow schemas of the canonical tables, and the checks that name what is wrong.

Ids (`user_id`, `item_id`, entity ids) may be int64 or strings: both are accepted, and a
table must use one kind per column. Strings are hashed to int64 once, at ingestion, by
`hash_ids` (stable across processes and machines, unlike Python's `hash`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class DataError(ValueError):
    """Bad input data: the message names the file (and row group / column / row)."""


@dataclass(frozen=True)
class Column:
    name: str
    kinds: tuple[str, ...]  # any of "id", "int", "float", "bool", "string", "domain", "int_list"
    required: bool = True
    nullable: bool = False


# `id` columns: int64 or string. `domain`: string or integer code.
TABLES: dict[str, tuple[Column, ...]] = {
    "interactions": (
        Column("user_id", ("id",)),
        Column("item_id", ("id",)),
        Column("domain", ("domain",)),
        Column("timestamp", ("int", "float")),
        Column("label", ("int", "float"), required=False),
        Column("rating", ("int", "float"), required=False, nullable=True),
    ),
    "items": (
        Column("item_id", ("id",)),
        Column("domain", ("domain",)),
        Column("text", ("string",), required=False, nullable=True),
    ),
    "users": (Column("user_id", ("id",)),),
    "triplets": (
        Column("head", ("id",)),
        Column("relation", ("id",)),
        Column("tail", ("id",)),
    ),
    "links": (
        Column("item_id", ("id",)),
        Column("entity_id", ("id",)),
        Column("domain", ("domain",), required=False),
    ),
    # One row per user (or user x domain): time-ordered item ids, as `xdtrain.data.sequences` writes them.
    "sequences": (
        Column("user_id", ("id",)),
        Column("domain", ("domain",), required=False),
        Column("items", ("int_list",)),
        Column("timestamps", ("int_list",), required=False),
    ),
    # One row per (user, target domain) of a two-domain pair (AMID, xdtrain.data.amid_rows): both
    # domains' item lists in one id space, the target is the last item of domain `domain_id`'s list.
    "two_domain_rows": (
        Column("user_id", ("id",)),
        Column("seq_d1", ("int_list",)),
        Column("seq_d2", ("int_list",)),
        Column("domain_id", ("int",)),
        Column("ob_label", ("int",), required=False),
    ),
    # Flat training rows that keep their feedback (`xdtrain.data.recipes`, stream "labelled"):
    # label (1 = positive, 0 = shown but not chosen, or a rating), observed (the row's user is observed).
    "labelled": (
        Column("user_id", ("id",)),
        Column("item_id", ("id",)),
        Column("domain", ("domain",)),
        Column("timestamp", ("int", "float")),
        Column("label", ("int", "float")),
        Column("observed", ("bool",)),
    ),
}

# The schema the generators and loaders write (ids as int64; string ids are also accepted on read).
CANONICAL: dict[str, pa.Schema] = {
    "interactions": pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("domain", pa.string()), ("timestamp", pa.int64())]
    ),
    "items": pa.schema([("item_id", pa.int64()), ("domain", pa.string()), ("text", pa.string())]),
    "users": pa.schema([("user_id", pa.int64())]),
    "triplets": pa.schema([("head", pa.int64()), ("relation", pa.int32()), ("tail", pa.int64())]),
    "links": pa.schema([("item_id", pa.int64()), ("entity_id", pa.int64()), ("domain", pa.string())]),
}


def _kind_ok(dtype: pa.DataType, kinds: tuple[str, ...]) -> bool:
    is_int = pa.types.is_integer(dtype)
    is_str = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    is_dict_str = pa.types.is_dictionary(dtype) and (
        pa.types.is_string(dtype.value_type) or pa.types.is_large_string(dtype.value_type)
    )
    for k in kinds:
        if k == "id" and (is_int or is_str):
            return True
        if k == "domain" and (is_int or is_str or is_dict_str):
            return True
        if k == "int" and is_int:
            return True
        if k == "float" and pa.types.is_floating(dtype):
            return True
        if k == "bool" and pa.types.is_boolean(dtype):
            return True
        if k == "string" and (is_str or is_dict_str):
            return True
        if k == "int_list" and pa.types.is_list(dtype) and pa.types.is_integer(dtype.value_type):
            return True
    return False


def check_schema(schema: pa.Schema, table: str, where: str) -> None:
    """Raise DataError naming `where` if `schema` lacks a required column or has a wrong type."""
    if table not in TABLES:
        raise DataError(f"unknown table kind {table!r}; expected one of {sorted(TABLES)}")
    names = set(schema.names)
    for col in TABLES[table]:
        if col.name not in names:
            if col.required:
                raise DataError(
                    f"{where}: missing required column '{col.name}' for {table} "
                    f"(found columns: {', '.join(schema.names)})"
                )
            continue
        dtype = schema.field(col.name).type
        if not _kind_ok(dtype, col.kinds):
            raise DataError(
                f"{where}: column '{col.name}' has type {dtype}, "
                f"expected {' or '.join(col.kinds)} for {table}"
            )


def check_batch(batch: pa.RecordBatch | pa.Table, table: str, where: str, row_offset: int = 0) -> None:
    """Schema check plus: no nulls in non-nullable columns (the first bad row is named)."""
    check_schema(batch.schema, table, where)
    for col in TABLES[table]:
        if col.nullable or col.name not in batch.schema.names:
            continue
        arr = batch.column(col.name)
        n_null = arr.null_count
        if n_null:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise DataError(
                f"{where}: column '{col.name}' has {n_null} null value(s) (first at row {row_offset + first})"
            )


def id_columns(table: str) -> list[str]:
    """The id columns (int64 or string) of a table kind."""
    return [c.name for c in TABLES[table] if "id" in c.kinds]


def hash_id_columns(data: pa.Table, table: str) -> pa.Table:
    """`data` with its string id columns (of table kind `table`) hashed to int64 by `hash_ids`."""
    for name in id_columns(table):
        if name in data.column_names and not pa.types.is_integer(data.schema.field(name).type):
            i = data.column_names.index(name)
            data = data.set_column(i, pa.field(name, pa.int64(), data.schema.field(name).nullable),
                                   pa.array(hash_ids(data[name]), pa.int64()))
    return data


def hash_ids(values: pa.Array | np.ndarray | list) -> np.ndarray:
    """Stable 63-bit hash (FNV-1a) of string ids; int64 ids pass through unchanged."""
    arr = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    if pa.types.is_integer(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
    # FNV-1a 64 over UTF-8 bytes, vectorised per unique value; deterministic everywhere.
    uniq, inverse = np.unique(np.asarray(arr.to_pylist(), dtype=object), return_inverse=True)
    hashed = np.fromiter((_fnv1a(s) for s in uniq), dtype=np.int64, count=len(uniq))
    return hashed[inverse]


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK63 = (1 << 63) - 1


def _fnv1a(s: str) -> int:
    h = _FNV_OFFSET
    for b in s.encode("utf-8"):
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h & _MASK63
