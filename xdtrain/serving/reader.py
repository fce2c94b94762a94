"""Lookup from one published embedding version (xdtrain/serving/store.py), pinned when opened.

    store = EmbeddingReader("runs/emb")            # reads CURRENT once: store.version
    vecs = store.vectors([3, 17], table="user")    # [2, d], in the order asked
    ids, scores = store.top_k([3, 17], k=10, domain="books")

Every answer comes from the version read at open, also after a newer one is published or CURRENT
is rolled back: vectors of different versions live in different spaces and are never mixed.

Memory stays bounded by the request, not the store: `vectors` reads only the bucket files the ids
hash to (at most `cache_buckets` kept). `top_k` serves the catalogue of one (table, domain) in one of
three ways (`index_kind`):
  "exact"    its matrix fits in `index_bytes` and it has fewer than `index_min_rows` rows: loaded
             once and kept, scored in blocks with an exact running top-k;
  "ivf"      it fits and has at least `index_min_rows` rows: loaded once into a faiss inner-product
             IVF index (xdtrain/serving/ann.py: `nprobe` of ~4 sqrt(n) lists scanned per query), which
             replaces the matrix (the build holds both for a moment: twice the matrix at peak);
  "streamed" it does not fit: read from its files block by block on each call, exact.
`top_k(..., exact=True)` forces the exact answer (an IVF index then probes every list; `ivf_index`
returns it); `nprobe` is read at each query, so it can be tuned on a built index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.outputs import resolve
from xdtrain.serving.ann import IVFIndex
from xdtrain.serving.store import bucket_of, part_name, read_current, require_version, table_dir

BLOCK_ROWS = 1 << 16  # catalogue rows scored together by top_k
USER_BLOCK = 256  # users scored together by top_k


def table_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids int64, vectors float32 [n, d], domains object array or None) of a vector table."""
    ids = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
    flat = pc.list_flatten(table.column("vector")).to_numpy().astype(np.float32, copy=False)
    vecs = flat.reshape(table.num_rows, -1) if table.num_rows else flat.reshape(0, 0)
    doms = (np.asarray(pc.cast(table.column("domain"), pa.string()).to_pylist(), dtype=object)
            if "domain" in table.column_names else None)
    return ids, vecs, doms


def topk_merge(scores: np.ndarray, ids: np.ndarray, best: tuple[np.ndarray, np.ndarray] | None,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block's scores [U, n] (columns ids [n]) into the running (scores [U, k'], ids [U, k'])."""
    cand_s = scores if best is None else np.concatenate([best[0], scores], axis=1)
    cand_i = np.broadcast_to(ids, scores.shape) if best is None else \
        np.concatenate([best[1], np.broadcast_to(ids, scores.shape)], axis=1)
    if cand_s.shape[1] > k:
        part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        cand_s, cand_i = np.take_along_axis(cand_s, part, 1), np.take_along_axis(cand_i, part, 1)
    return cand_s, cand_i


class _Bucket:
    """One bucket file, sorted by (id, domain) for lookups."""

    def __init__(self, table: pa.Table) -> None:
        ids, vecs, doms = table_arrays(table)
        order = np.lexsort((doms.astype(str), ids)) if doms is not None else np.argsort(ids, kind="stable")
        self.ids, self.vecs = ids[order], vecs[order]
        self.doms = doms[order] if doms is not None else None

    def find(self, ids: np.ndarray, domain: str | None) -> np.ndarray:
        """Row of each id (-1: absent); with `domain`, the row of (id, domain)."""
        lo = np.searchsorted(self.ids, ids, "left")
        hi = np.searchsorted(self.ids, ids, "right")
        out = np.where(hi > lo, lo, -1)
        if domain is None or self.doms is None:
            return out
        out[:] = -1
        for off in range(int((hi - lo).max(initial=0))):
            pos = np.minimum(lo + off, len(self.ids) - 1)
            hit = (lo + off < hi) & (self.doms[pos] == domain) & (out < 0)
            out[hit] = pos[hit]
        return out


class EmbeddingReader:
    """Answers from one finished version of the store at `out` (`version`, default CURRENT)."""

    def __init__(self, out: str, version: str = "", cache_buckets: int = 8, index_bytes: int = 1 << 30,
                 index_min_rows: int = 100_000, nprobe: int = 128, index_seed: int = 0, threads: int = 0) -> None:
        self.fs, self.out = resolve(out)
        if not version:
            version = read_current(self.out) or ""
            if not version:
                raise DataError(f"{self.out}: no published embedding version (no CURRENT)")
        self.version = version
        self.info = require_version(self.out, version)
        self.cache_buckets, self.index_bytes = cache_buckets, index_bytes
        self.index_min_rows, self.nprobe, self.index_seed, self.threads = index_min_rows, nprobe, index_seed, threads
        self._buckets: OrderedDict[tuple[str, int], _Bucket] = OrderedDict()
        # (table, domain) -> its held catalogue: the matrix (ids, vectors) or an IVF index
        self._held: dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray] | IVFIndex] = {}

    @property
    def tables(self) -> list[str]:
        return sorted(self.info["tables"])

    def _meta(self, table: str) -> dict:
        if table not in self.info["tables"]:
            raise KeyError(f"version {self.version} has no table {table!r} (it has {self.tables})")
        return self.info["tables"][table]

    def _read(self, table: str, bucket: int) -> pa.Table:
        with self.fs.open(f"{table_dir(self.out, self.version, table)}/{part_name(bucket)}", "rb") as f:
            return pq.read_table(f)

    def _bucket(self, table: str, bucket: int) -> _Bucket:
        key = (table, bucket)
        if key not in self._buckets:
            self._buckets[key] = _Bucket(self._read(table, bucket))
            while len(self._buckets) > self.cache_buckets:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        return self._buckets[key]

    def lookup(self, ids: Sequence[int] | np.ndarray, table: str = "item",
               domain: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [len(ids), d] float32, found [len(ids)] bool): the rows this version has, zeros
        where it has none. A table keyed by (id, domain) needs `domain`."""
        meta = self._meta(table)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keyed = "domain" in meta["keys"]
        if keyed and domain is None:
            raise KeyError(f"table {table!r} of version {self.version} is keyed by (id, domain): pass domain=")
        out = np.zeros((len(ids), meta["dim"]), np.float32)
        found = np.zeros(len(ids), bool)
        buckets = bucket_of(ids, meta["buckets"])
        for b in np.unique(buckets):
            sel = np.flatnonzero(buckets == b)
            part = self._bucket(table, int(b))
            rows = part.find(ids[sel], domain if keyed else None)
            ok = rows >= 0
            out[sel[ok]] = part.vecs[rows[ok]]
            found[sel[ok]] = True
        return out, found

    def vectors(self, ids: Sequence[int] | np.ndarray, table: str = "item", domain: str | None = None) -> np.ndarray:
        """[len(ids), d] float32 in the order of `ids`; KeyError names ids this version has no row for."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out, found = self.lookup(ids, table, domain)
        if not found.all():
            where = f" in domain {domain!r}" if domain is not None else ""
            raise KeyError(f"version {self.version}, table {table!r}: no vector for ids "
                           f"{ids[~found][:5].tolist()}{where}")
        return out

    def _stream(self, table: str, domain: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of the table's rows of `domain` (all rows when None), read block by block."""
        for b in range(self._meta(table)["buckets"]):
            with self.fs.open(f"{table_dir(self.out, self.version, table)}/{part_name(b)}", "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=BLOCK_ROWS):
                    ids, vecs, doms = table_arrays(pa.Table.from_batches([batch]))
                    if domain is not None and doms is not None:
                        ids, vecs = ids[doms == domain], vecs[doms == domain]
                    yield ids, vecs

    def _catalogue(self, table: str, domain: str | None) -> tuple[np.ndarray, np.ndarray] | IVFIndex | None:
        """The held catalogue of (table, domain), loaded on first use; None when it does not fit."""
        key = (table, domain)
        if key not in self._held:
            meta = self._meta(table)
            if meta["rows"] * meta["dim"] * 4 > self.index_bytes:
                return None
            kept = list(self._stream(table, domain))
            ids = np.concatenate([np.zeros(0, np.int64)] + [i for i, _ in kept])
            vecs = np.concatenate([np.zeros((0, meta["dim"]), np.float32)] + [v for _, v in kept])
            del kept
            if len(ids) >= max(1, self.index_min_rows):
                self._held[key] = IVFIndex(ids, vecs, seed=self.index_seed, threads=self.threads)
            else:
                self._held[key] = (ids, vecs)
        return self._held[key]

    def index_kind(self, table: str = "item", domain: str | None = None) -> str:
        """How `top_k` serves (table, domain): "ivf", "exact" or "streamed" (see the module doc).
        Loads (and for "ivf" builds) the held catalogue on first call, as `top_k` would."""
        held = self._catalogue(table, domain)
        return "streamed" if held is None else "ivf" if isinstance(held, IVFIndex) else "exact"

    def ivf_index(self, table: str = "item", domain: str | None = None) -> IVFIndex | None:
        """The IVF index serving (table, domain) (its `nlist`, `rows`, `nbytes`), None when not "ivf"."""
        held = self._catalogue(table, domain)
        return held if isinstance(held, IVFIndex) else None

    def _blocks(self, held: tuple[np.ndarray, np.ndarray] | None, table: str,
                domain: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if held is None:
            yield from self._stream(table, domain)
            return
        for a in range(0, len(held[0]), BLOCK_ROWS):
            yield held[0][a : a + BLOCK_ROWS], held[1][a : a + BLOCK_ROWS]

    def top_k(self, user_ids: Sequence[int] | np.ndarray, k: int = 10, domain: str | None = None,
              user_table: str = "user", item_table: str = "item",
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The k items of `domain` (every item when None) with the largest inner product with each
        user's vector (the zero-shot ranker): (item ids [U, k], scores [U, k]), best first. Served as
        `index_kind(item_table, domain)` says; `exact` forces the exact top-k. From the IVF index
        a row may end in id -1 (score -inf) when the lists probed hold fewer than k items."""
        users = self.vectors(user_ids, user_table, domain if "domain" in self._meta(user_table)["keys"] else None)
        held = self._catalogue(item_table, domain)
        if isinstance(held, IVFIndex):
            scores, ids = held.search(users, min(k, held.rows), held.nlist if exact else self.nprobe)
            return ids, scores
        best_s, best_i = [], []
        for a in range(0, len(users), USER_BLOCK):
            u = users[a : a + USER_BLOCK]
            best = None
            for ids, vecs in self._blocks(held, item_table, domain):
                if len(ids):
                    best = topk_merge(u @ vecs.T, ids, best, k)
            if best is None:
                raise KeyError(f"version {self.version}, table {item_table!r}: no items in domain {domain!r}")
            order = np.argsort(-best[0], axis=1, kind="stable")
            best_s.append(np.take_along_axis(best[0], order, 1))
            best_i.append(np.take_along_axis(best[1], order, 1))
        return np.concatenate(best_i), np.concatenate(best_s)
