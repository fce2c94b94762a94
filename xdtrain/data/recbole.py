"""Reader for RecBole atomic files (`.inter .item .user .kg .link`).

An atomic file is tab-separated UTF-8 text. The first line names the columns as `name:type`,
type one of `token`, `token_seq`, `float`, `float_seq`; sequences are space-separated inside
one field. There is no quoting: a `"` in a title is just a character.

Types on read:
- token     -> string
- token_seq -> list<string> (empty tokens dropped), or the raw space-joined string for the
               columns named in `keep_string` (titles, which RecBole ML-100K stores as token_seq)
- float     -> int64 when every value parses as an integer (ratings, timestamps, ages, years),
               else float64; an empty field is null
- float_seq -> list<float64>

Each field keeps its declared RecBole type in its Arrow field metadata (`recbole_type`).
Errors (bad header, wrong column count, a float that is not a number) raise `DataError`
naming the file and the line (1-based, the header is line 1).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xdtrain.data.schemas import DataError

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
ATOMIC_SUFFIXES = ("inter", "item", "user", "kg", "link")


def parse_header(line: str, where: str) -> list[tuple[str, str]]:
    """Split a header line into (name, type) pairs; DataError on a missing or unknown type."""
    fields = line.rstrip("\r\n").split("\t")
    out = []
    for i, field in enumerate(fields):
        name, sep, typ = field.rpartition(":")
        if not sep or not name:
            raise DataError(f"{where}: line 1, column {i + 1} '{field}': header field is not 'name:type'")
        if typ not in ATOMIC_TYPES:
            raise DataError(
                f"{where}: line 1, column '{name}': unknown type '{typ}' "
                f"(expected one of {', '.join(ATOMIC_TYPES)})"
            )
        out.append((name, typ))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{where}: line 1: duplicate column name(s) {dup}")
    return out


def read_atomic(path: str | Path, keep_string: Iterable[str] = ()) -> pa.Table:
    """Read one RecBole atomic file into a typed pyarrow Table (see the module docstring)."""
    where = str(path)
    try:
        with fsspec.open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first name
        data = data[3:]
    head, nl, _ = data.partition(b"\n")
    if not head.strip():
        raise DataError(f"{where}: empty file (no header line)")
    try:
        header = parse_header(head.decode("utf-8"), where)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: line 1 is not UTF-8 ({e})") from None
    names = [n for n, _ in header]
    raw = _read_strings(data, names, where, use_threads=True) if nl else _empty_strings(names)
    keep = set(keep_string)
    columns, fields = [], []
    for name, typ in header:
        arr = _convert(raw.column(name), name, typ, keep, where)
        columns.append(arr)
        fields.append(pa.field(name, arr.type, metadata={"recbole_type": typ}))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _empty_strings(names: list[str]) -> pa.Table:
    return pa.table({n: pa.array([], pa.string()) for n in names})


def _read_strings(data: bytes, names: list[str], where: str, use_threads: bool) -> pa.Table:
    """Parse every field as a string; the first row with a wrong field count becomes a DataError."""
    bad: list = []

    def on_invalid(row) -> str:
        if not bad:
            bad.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{where}: cannot parse ({e})") from None
    if bad:
        row = bad[0]
        if row.number is None and use_threads:
            # Threaded parsing does not know line numbers: re-parse serially (error path only).
            return _read_strings(data, names, where, use_threads=False)
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        raise DataError(
            f"{where}: line {row.number}: expected {row.expected_columns} tab-separated fields "
            f"({', '.join(names)}), got {row.actual_columns}: {text!r}"
        )
    return table


def _first_bad(ok: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first False in a boolean array (nulls count as bad)."""
    ok_np = np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)
    return int(np.argmin(ok_np))


def _to_number(
    col: pa.ChunkedArray, name: str, where: str, row_of: np.ndarray | None = None
) -> pa.ChunkedArray:
    """Strings -> int64 if all values are integers, else float64; '' -> null.

    `row_of` maps a value's index to its data row (for the flattened values of a float_seq).
    """
    col = pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), pa.scalar(None, pa.string()), col)
    try:
        return pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        return pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pattern = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*[-+]?(inf|nan|infinity)\s*$"
        ok = pc.or_(pc.is_null(col), pc.match_substring_regex(col, pattern, ignore_case=True))
        i = _first_bad(ok)
        row = int(row_of[i]) if row_of is not None else i
        raise DataError(
            f"{where}: line {row + 2}, column '{name}': {col[i].as_py()!r} is not a number"
        ) from None


def _split_seq(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Space-separated field -> list of non-empty tokens."""
    parts = pc.split_pattern(col, " ")
    parts = parts.combine_chunks() if isinstance(parts, pa.ChunkedArray) else parts
    flat = parts.flatten()
    keep = pc.not_equal(flat, "")
    if pc.all(keep).as_py() is not False:
        return pa.chunked_array([parts])
    # Rebuild offsets without the empty tokens (double spaces, empty fields).
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(len(counts)), counts)
    keep_np = keep.to_numpy(zero_copy_only=False)
    new_counts = np.bincount(row_of[keep_np], minlength=len(counts))
    offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int32)
    return pa.chunked_array([pa.ListArray.from_arrays(pa.array(offsets), pc.filter(flat, keep))])


def _convert(col: pa.ChunkedArray, name: str, typ: str, keep: set[str], where: str) -> pa.ChunkedArray:
    if typ == "token" or (typ == "token_seq" and name in keep):
        return col
    if typ == "token_seq":
        return _split_seq(col)
    if typ == "float":
        return _to_number(col, name, where)
    # float_seq: split, parse the flat values, re-wrap with the same offsets.
    lists = _split_seq(col).combine_chunks()
    row_of = np.repeat(np.arange(len(lists)), pc.list_value_length(lists).to_numpy(zero_copy_only=False))
    values = _to_number(pa.chunked_array([lists.flatten()]), name, where, row_of)
    values = pc.cast(values, pa.float64()).combine_chunks()
    return pa.chunked_array([pa.ListArray.from_arrays(lists.offsets, values)])


def read_atomic_dir(
    directory: str | Path, dataset: str, keep_string: Iterable[str] = ()
) -> dict[str, pa.Table]:
    """Read every `<dataset>.<suffix>` atomic file present in `directory`, keyed by suffix."""
    directory = Path(directory)
    out = {}
    for suffix in ATOMIC_SUFFIXES:
        path = directory / f"{dataset}.{suffix}"
        if path.exists():
            out[suffix] = read_atomic(path, keep_string)
    if not out:
        raise DataError(
            f"{directory}: no RecBole atomic files named {dataset}.{{{','.join(ATOMIC_SUFFIXES)}}}"
        )
    return out


def dense_ids(values: pa.Array | pa.ChunkedArray, start: int = 1) -> tuple[np.ndarray, pa.Array]:
    """Map string ids to dense int64 codes in order of first appearance, starting at `start`.

    Returns (codes, vocab) with vocab[code - start] == the original string. Ids start at 1 by
    default so that 0 is never a real id (it stays free for padding in sequence models).
    """
    vocab = pc.unique(values)
    if isinstance(vocab, pa.ChunkedArray):
        vocab = vocab.combine_chunks()
    codes = pc.index_in(values, value_set=vocab).to_numpy(zero_copy_only=False)
    return codes.astype(np.int64) + start, vocab


def lookup_ids(
    values: pa.Array | pa.ChunkedArray, vocab: pa.Array, start: int, where: str, what: str
) -> np.ndarray:
    """Codes of `values` in `vocab` (as made by `dense_ids`); DataError names the first unknown value."""
    idx = pc.index_in(values, value_set=vocab)
    if idx.null_count:
        i = _first_bad(pc.is_valid(idx))
        raise DataError(f"{where}: line {i + 2}: {what} {values[i].as_py()!r} is not defined")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64) + start


def kg_tables(
    kg: pa.Table, link: pa.Table, item_raw: pa.Array, item_codes: np.ndarray, where: str
) -> dict[str, pa.Table]:
    """RecBole `.kg` + `.link` -> canonical `triplets`, `links`, plus the id maps `entities`, `relations`.

    Entity ids are dense int64 from 1: linked entities first (in `.link` order, so items' entities
    come first), then the rest in order of first appearance in `.kg`. Relation ids are dense int32
    from 0 in order of first appearance: they index edge types, which DGL counts from 0.
    Item ids of `.link` are raw strings; `item_raw[i]` has the int64 id `item_codes[i]`.
    """
    for table, cols, name in (
        (kg, ("head_id", "relation_id", "tail_id"), "kg"),
        (link, ("item_id", "entity_id"), "link"),
    ):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise DataError(f"{where}.{name}: missing column(s) {missing} (found {table.column_names})")
    all_entities = pa.chunked_array(
        link["entity_id"].chunks + kg["head_id"].chunks + kg["tail_id"].chunks, type=pa.string()
    )
    _, ent_vocab = dense_ids(all_entities)
    rel_codes, rel_vocab = dense_ids(kg["relation_id"], start=0)
    ent = {c: lookup_ids(kg[c], ent_vocab, 1, f"{where}.kg", "entity") for c in ("head_id", "tail_id")}
    triplets = pa.table(
        {
            "head": pa.array(ent["head_id"], pa.int64()),
            "relation": pa.array(rel_codes.astype(np.int32), pa.int32()),
            "tail": pa.array(ent["tail_id"], pa.int64()),
        }
    )
    links = pa.table(
        {
            "item_id": pa.array(
                item_codes[lookup_ids(link["item_id"], item_raw, 0, f"{where}.link", "item")]
            ),
            "entity_id": pa.array(
                lookup_ids(link["entity_id"], ent_vocab, 1, f"{where}.link", "entity"), pa.int64()
            ),
        }
    )
    entities = pa.table(
        {"entity_id": pa.array(np.arange(1, len(ent_vocab) + 1), pa.int64()), "raw_id": ent_vocab}
    )
    relations = pa.table({"relation": pa.array(np.arange(len(rel_vocab)), pa.int32()), "name": rel_vocab})
    return {"triplets": triplets, "links": links, "entities": entities, "relations": relations}
