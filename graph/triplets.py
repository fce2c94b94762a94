"""Read triplet (and link) Parquet in chunks and sort good rows from bad ones, with a report.

A bad triplet is one with a null head/relation/tail, a relation outside the known relations, or an
entity id out of range (negative, or above `max_entity_id` when one is set). By default the first
chunk holding one raises `DataError` naming the file, the row and the counts; with
`on_bad="skip"` bad rows are dropped and counted per kind and per file in a `BadReport`, which the
build returns and saves with the graph, so nothing is dropped silently.

String entity ids are hashed with `hash_ids` (like every other id in xdtrain); string relations
map to their index in a vocabulary (given, or the sorted distinct names in the data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError, check_schema, hash_ids

from .store import url_to_fs

BAD_KINDS = ("null_id", "null_relation", "unknown_relation", "id_out_of_range", "unknown_entity")
_EXAMPLES = 5


def list_parquet(url: str) -> tuple[object, list[str]]:
    """(filesystem, sorted Parquet paths) of a file or a directory (hidden `.`/`_` files skipped)."""
    fs, root = url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"{url}: no such file or directory")
    if fs.isfile(root):
        return fs, [root]
    def visible(p: str) -> bool:
        return not any(part.startswith((".", "_")) for part in p[len(root):].split("/"))

    paths = sorted(p for p in fs.find(root) if p.endswith(".parquet") and visible(p))
    if not paths:
        raise DataError(f"{url}: no Parquet files found")
    return fs, paths


def count_rows(fs, paths: list[str]) -> int:
    total = 0
    for p in paths:
        try:
            with fs.open(p, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{p}: cannot read Parquet metadata ({e})") from None
    return total


def iter_chunks(fs, paths: list[str], table: str | None, columns: list[str], chunk_rows: int
                ) -> Iterator[tuple[str, int, pa.RecordBatch]]:
    """Yield (path, first row in file, batch) over every file, checking each file's schema first
    (against `TABLES[table]`, or only for the presence of `columns` when table is None)."""
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if table is not None:
                    check_schema(pf.schema_arrow, table, path)
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise DataError(f"{path}: missing column(s) {missing} (found {pf.schema_arrow.names})")
                row = 0
                for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
                    yield path, row, batch
                    row += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: cannot read Parquet ({e})") from None


@dataclass
class BadReport:
    """Counts of dropped rows by kind and by file, plus a few examples."""

    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_file: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def add(self, path: str, kind: str, n: int, example: dict) -> None:
        if not n:
            return
        self.total += n
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        per = self.by_file.setdefault(path, {})
        per[kind] = per.get(kind, 0) + n
        if len(self.examples) < _EXAMPLES:
            self.examples.append({"file": path, "kind": kind, **example})

    def to_dict(self) -> dict:
        return {"total": self.total, "by_kind": self.by_kind, "by_file": self.by_file,
                "examples": self.examples}

    def summary(self) -> str:
        files = ", ".join(f"{p} ({sum(k.values())})" for p, k in self.by_file.items())
        return f"{self.total} bad row(s) dropped {self.by_kind} in {files}"


def decode_ids(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids with nulls as 0, null mask) of an int or string id column."""
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(arr.type):
        return np.asarray(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False), dtype=np.int64), null
    return hash_ids(pc.fill_null(arr.cast(pa.string()), "")), null


class RelationVocab:
    """Relation column -> dense relation ids. Integers must lie in [0, n) (n = 0: any >= 0, n inferred);
    strings index `names` (when empty: every name is known, and ids follow the sorted names)."""

    def __init__(self, n_relations: int = 0, names: list[str] | None = None) -> None:
        self.n = int(n_relations)
        self.names = list(names or [])
        self.kind: str | None = None  # "int" or "string", from the first chunk
        self.seen: dict[str, int] = {}  # string names met while the vocabulary is open

    def encode(self, arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(relation ids, known mask); nulls are neither known nor counted here."""
        kind = "int" if pa.types.is_integer(arr.type) else "string"
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise DataError(f"{where}: column 'relation' is {arr.type}, "
                            f"earlier files had {self.kind} relations")
        if kind == "int":
            rel = np.asarray(pc.fill_null(arr, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
            known = (rel >= 0) & ((rel < self.n) if self.n else True)
            return rel, known
        arr = arr.cast(pa.string())
        if not self.names:  # open vocabulary: remember names, ids are assigned once all are seen
            for name in pc.unique(arr.drop_null()).to_pylist():
                self.seen.setdefault(name, len(self.seen))
            idx = pc.index_in(arr, value_set=pa.array(list(self.seen), pa.string()))
            return np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), np.int64), ~arr.is_null(
            ).to_numpy(zero_copy_only=False)
        idx = pc.index_in(arr, value_set=pa.array(self.names, pa.string()))
        rel = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
        return rel, rel >= 0

    def close(self, max_seen: int) -> None:
        """End of the first pass: fix the vocabulary (sorted names, or n from the largest id)."""
        if self.kind == "string" and not self.names:
            self.names = sorted(self.seen)
            self.n = len(self.names)
        elif self.kind == "string":
            self.n = len(self.names)
        elif not self.n:
            self.n = max_seen + 1

    def reorder_counts(self, counts: np.ndarray) -> np.ndarray:
        """First-pass counts of an open string vocabulary (by first-seen index) -> by final id."""
        if self.kind != "string" or not self.seen:
            return counts
        out = np.zeros(self.n, dtype=counts.dtype)
        for name, first in self.seen.items():
            if first < len(counts):
                out[self.names.index(name)] = counts[first]
        return out

    def type_names(self) -> list[str]:
        return list(self.names) if self.names else [str(r) for r in range(self.n)]


@dataclass
class TripletChunk:
    head: np.ndarray  # int64 raw ids of the good rows
    relation: np.ndarray  # int64 relation ids of the good rows
    tail: np.ndarray
    n_bad: int


class TripletChecker:
    """Decode one chunk, find its bad rows, and raise or record them per the policy."""

    def __init__(self, vocab: RelationVocab, max_entity_id: int = -1, on_bad: str = "raise",
                 known: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """`known`: raw ids -> dense ids or -1 (a given entity table); ids it lacks are unknown_entity."""
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.vocab, self.max_id, self.on_bad, self.known = vocab, int(max_entity_id), on_bad, known
        self.report = BadReport()

    def check(self, batch: pa.RecordBatch, path: str, row0: int, record: bool = True) -> TripletChunk:
        head, h_null = decode_ids(batch.column("head"))
        tail, t_null = decode_ids(batch.column("tail"))
        rel_col = batch.column("relation")
        rel, known = self.vocab.encode(rel_col, path)
        kinds = {
            "null_id": h_null | t_null,
            "null_relation": np.asarray(rel_col.is_null().to_numpy(zero_copy_only=False), dtype=bool),
        }
        kinds["unknown_relation"] = ~known & ~kinds["null_relation"]
        out = (head < 0) | (tail < 0)
        if self.max_id >= 0:
            out |= (head > self.max_id) | (tail > self.max_id)
        kinds["id_out_of_range"] = out & ~kinds["null_id"]
        if self.known is not None:
            unknown = (self.known(head) < 0) | (self.known(tail) < 0)
            kinds["unknown_entity"] = unknown & ~out & ~kinds["null_id"]
        bad = np.zeros(batch.num_rows, dtype=bool)
        for kind, mask in kinds.items():  # each row counts once, under its first kind
            mask &= ~bad
            kinds[kind] = mask
            bad |= mask
        n_bad = int(bad.sum())
        if n_bad and (record or self.on_bad == "raise"):
            self._bad(batch, path, row0, kinds, n_bad)
        good = ~bad
        return TripletChunk(head[good], rel[good], tail[good], n_bad)

    def _bad(self, batch: pa.RecordBatch, path: str, row0: int, kinds: dict, n_bad: int) -> None:
        counts = {k: int(m.sum()) for k, m in kinds.items() if m.any()}
        first_kind = min((int(np.argmax(m)), k) for k, m in kinds.items() if m.any())
        i, kind = first_kind
        row = {c: batch.column(c)[i].as_py() for c in ("head", "relation", "tail")}
        if self.on_bad == "raise":
            raise DataError(
                f"{path}: row {row0 + i}: bad triplet ({kind}) {row}; {n_bad} bad triplet(s) in rows "
                f"{row0}-{row0 + batch.num_rows - 1} {counts} (on_bad=skip drops and reports them)"
            )
        for k, m in kinds.items():
            if m.any():
                j = int(np.argmax(m))
                ex = {"row": row0 + j}
                ex.update({c: batch.column(c)[j].as_py() for c in ("head", "relation", "tail")})
                self.report.add(path, k, int(m.sum()), ex)
