"""Item-text embeddings with a sentence-transformers model, cached to Parquet.

PreRec's f_BERT (Eq. 1) is frozen, so every item's text is encoded once. The cache is a folder
per model (`<cache_dir>/<model tag>/part-*.parquet`) of rows

    domain: string, item_id: int64, text_hash: int64, embedding: fixed_size_list<float32>[dim]

keyed by (domain, item_id, text_hash): an item whose text is unchanged is never re-encoded, an
item whose text changed gets a new row (the old one is simply never matched again). Each run
adds one part, written under a temporary name and renamed, so a crash never leaves a half part
and concurrent runs never overwrite each other. `compact_cache` rewrites the live rows as one part.

Two ways to fill it: `encode_items` (in-process, batched) and `encode_items_ray` (a Ray Data
`map_batches` over an actor pool, one model per actor, writing its parts in parallel: for
large catalogues). Both return the catalogue's vectors as `ItemVectors`.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError, hash_ids
from xdtrain.data.validate import read_dataset
from xdtrain.outputs import AtomicFile, claim_output_dir, remove_owned
from xdtrain.text.encoder import DEFAULT_MODEL, load_text_encoder, resolve_model_path

KEYS = ["domain", "item_id", "text_hash"]


@dataclass
class TextEncodeConfig:
    model: str = DEFAULT_MODEL  # "minilm" (shipped all-MiniLM-L6-v2) or a local model directory
    cache_dir: str = "runs/text_cache"  # any fsspec URL
    batch_size: int = 128  # texts per encoder call
    normalize: bool = True  # unit-length embeddings
    device: str = "cpu"
    num_actors: int = 2  # Ray path: encoder actors
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0


# ---------------------------------------------------------------- keys


def text_hashes(texts: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """Stable 63-bit hash (blake2b) of each text, the same on every machine."""
    values = texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else list(texts)
    uniq, inverse = np.unique(np.asarray(values, dtype=object), return_inverse=True)
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for s in uniq),
        dtype=np.int64, count=len(uniq),
    )
    return h[inverse]


def model_tag(model: str, normalize: bool) -> str:
    """Folder name of a model's cache: embeddings of different models never mix."""
    if model == DEFAULT_MODEL:
        base = DEFAULT_MODEL
    else:
        path = str(Path(resolve_model_path(model)).resolve())
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name) + "-" + hashlib.blake2b(
            path.encode(), digest_size=4).hexdigest()
    return f"{base}-{'norm' if normalize else 'raw'}"


def item_keys(items: pa.Table, where: str = "items") -> pa.Table:
    """(domain, item_id, text_hash, text) of an items table, after checking its columns."""
    for col in ("domain", "item_id", "text"):
        if col not in items.schema.names:
            raise DataError(f"{where}: missing column '{col}' (found: {', '.join(items.schema.names)})")
    text = items.column("text")
    if text.null_count:
        r = pc.index(pc.is_null(text), True).as_py()
        raise DataError(f"{where}: row {r} (domain {items['domain'][r]}, item {items['item_id'][r]}) has no "
                        "text; every item needs one for its text embedding")
    for col in ("domain", "item_id"):
        if items.column(col).null_count:
            raise DataError(f"{where}: column '{col}' has null values")
    out = pa.table({
        "domain": pc.cast(items.column("domain"), pa.string()),
        "item_id": pa.array(hash_ids(items.column("item_id")), pa.int64()),
        "text_hash": pa.array(text_hashes(text), pa.int64()),
        "text": pc.cast(text, pa.string()),
    })
    dup = out.group_by(["domain", "item_id"]).aggregate([("text_hash", "count_distinct")])
    bad = dup.filter(pc.greater(dup["text_hash_count_distinct"], 1))
    if bad.num_rows:
        raise DataError(f"{where}: item {bad['item_id'][0]} of domain {bad['domain'][0]} has several texts")
    return out.group_by(KEYS + ["text"]).aggregate([]).select(KEYS + ["text"])  # one row per key


# ---------------------------------------------------------------- the vectors a model reads


class ItemVectors:
    """Per-domain catalogues (sorted item ids) and their vectors; `lookup` is vectorised."""

    def __init__(self, by_domain: dict[str, tuple[np.ndarray, np.ndarray]]):
        self._d: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        dims = set()
        for d, (ids, vecs) in by_domain.items():
            ids = np.asarray(ids, dtype=np.int64)
            order = np.argsort(ids, kind="stable")
            ids, vecs = ids[order], np.ascontiguousarray(np.asarray(vecs, dtype=np.float32)[order])
            if len(ids) and (ids[1:] == ids[:-1]).any():
                raise DataError(f"item vectors: domain '{d}' lists item {ids[1:][ids[1:] == ids[:-1]][0]} twice")
            dims.add(vecs.shape[1])
            self._d[str(d)] = (ids, vecs)
        if len(dims) > 1:
            raise DataError(f"item vectors: domains have different dimensions {sorted(dims)}")
        self.dim = dims.pop() if dims else 0

    @classmethod
    def from_table(cls, table: pa.Table, column: str = "embedding") -> ItemVectors:
        """From rows (domain, item_id, <column>: fixed-size or variable list of floats)."""
        dom = np.asarray(pc.cast(table["domain"], pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        ids = hash_ids(table["item_id"])
        col = table[column].combine_chunks()
        dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
        flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        vecs = flat.reshape(len(ids), dim or (len(flat) // max(len(ids), 1)))
        return cls({d: (ids[dom == d], vecs[dom == d]) for d in np.unique(dom)})

    @property
    def domains(self) -> list[str]:
        return sorted(self._d)

    def catalogue(self, domain: str) -> np.ndarray:
        return self._entry(domain)[0]

    def _entry(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        if str(domain) not in self._d:
            raise KeyError(f"no item vectors for domain '{domain}' (have: {', '.join(self.domains)})")
        return self._d[str(domain)]

    def positions(self, domain: str, ids: np.ndarray) -> np.ndarray:
        """Positions of ids in the domain's catalogue; an unknown id is an error naming it."""
        cat = self._entry(domain)[0]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(cat, ids).clip(max=max(len(cat) - 1, 0))
        bad = cat[pos] != ids if len(cat) else np.ones(ids.shape, bool)
        if bad.any():
            raise KeyError(f"item {int(ids[bad].reshape(-1)[0])} of domain '{domain}' has no text vector")
        return pos

    def lookup(self, domain: str, ids: np.ndarray) -> np.ndarray:
        """[*ids.shape, dim] float32."""
        return self._entry(domain)[1][self.positions(domain, ids)]

    def vectors(self, domain: str) -> np.ndarray:
        """[len(catalogue), dim], aligned with `catalogue(domain)`."""
        return self._entry(domain)[1]


# ---------------------------------------------------------------- the cache folder


class TextCache:
    """The Parquet parts of one model's cache (see the module docstring)."""

    def __init__(self, cache_dir: str, model: str = DEFAULT_MODEL, normalize: bool = True):
        self.fs, root = fsspec.core.url_to_fs(cache_dir)
        self.root = f"{root.rstrip('/')}/{model_tag(model, normalize)}"

    def parts(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(p for p in self.fs.ls(self.root, detail=False) if is_part(p))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for p in self.parts():
            try:
                with self.fs.open(p, "rb") as f:
                    tables.append(pq.read_table(f, columns=columns))
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{p}: unreadable text-cache part ({e})") from e
        if not tables:
            return _empty(columns)
        return pa.concat_tables(tables, promote_options="default")

    def write_part(self, rows: pa.Table) -> str | None:
        """Add rows (KEYS + embedding) as a new part; temporary name first, then rename."""
        if rows.num_rows == 0:
            return None
        self.claim()
        final = f"{self.root}/{part_name()}"
        with AtomicFile(final, self.fs) as f:
            pq.write_table(rows.select(KEYS + ["embedding"]), f)
        return final

    def claim(self) -> None:
        """Mark the cache folder as xdtrain's when this creates it (a new part never overwrites anything,
        so an existing folder is used as it is; only `compact_cache` deletes, and only in a marked one)."""
        if not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False):
            claim_output_dir(self.root, "text cache", fs=self.fs)

    def split(self, keys: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(cached rows for `keys` with their embedding, the keys not cached yet)."""
        have = self.read()
        if not have.num_rows:
            return _empty(None), keys
        found = take_matching(keys.select(KEYS), have)
        missing = keys.join(have.select(KEYS), KEYS, join_type="left anti")
        return found, missing


_PART = re.compile(r"part-[0-9a-f]{32}\.parquet")


def part_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def is_part(path: str) -> bool:
    """A part the cache wrote (`part_name`); anything else in the folder is not read or deleted."""
    return bool(_PART.fullmatch(path.rstrip("/").rpartition("/")[2]))


def take_matching(keys: pa.Table, rows: pa.Table) -> pa.Table:
    """The rows (KEYS + embedding) whose key is in `keys`, one per key (duplicates are identical).
    Joins carry a row index only: the embedding column is gathered with `take`."""
    idx = rows.select(KEYS).append_column("_row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    first = idx.group_by(KEYS).aggregate([("_row", "min")]).rename_columns(KEYS + ["_row"])
    hit = keys.select(KEYS).join(first, KEYS, join_type="inner")
    return rows.select(KEYS + ["embedding"]).take(hit["_row"])


def _empty(columns: list[str] | None) -> pa.Table:
    schema = pa.schema([("domain", pa.string()), ("item_id", pa.int64()), ("text_hash", pa.int64()),
                        ("embedding", pa.list_(pa.float32()))])
    t = schema.empty_table()
    return t.select(columns) if columns else t


def compact_cache(cache_dir: str, items: pa.Table, model: str = DEFAULT_MODEL, normalize: bool = True) -> int:
    """Rewrite the rows of the current `items` texts as one part and drop the old parts; returns rows kept."""
    cache = TextCache(cache_dir, model, normalize)
    old = cache.parts()
    found, _ = cache.split(item_keys(items))
    cache.write_part(found)  # before removing anything: a crash leaves duplicates, never a loss
    for p in old:
        remove_owned(p, cache.root, cache.fs, created=is_part)
    return found.num_rows


# ---------------------------------------------------------------- encoding


def _embedding_column(vecs: np.ndarray) -> pa.Array:
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), vecs.shape[1])


class _Encoder:
    """Encodes the texts of key rows (each distinct text once); Ray Data builds one per actor."""

    def __init__(self, model: str, device: str, normalize: bool, batch_size: int):
        self.model = load_text_encoder(model, device=device)
        self.normalize, self.batch_size = normalize, batch_size

    def __call__(self, rows: pa.Table) -> pa.Table:
        texts, inverse = np.unique(np.asarray(rows["text"].to_pylist(), dtype=object), return_inverse=True)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                 convert_to_numpy=True, show_progress_bar=False)
        return rows.select(KEYS).append_column("embedding", _embedding_column(np.asarray(vecs)[inverse]))


@dataclass
class EncodedItems:
    vectors: ItemVectors
    n_encoded: int  # rows encoded in this call
    n_cached: int  # rows found in the cache


def _finish(keys: pa.Table, found: pa.Table, new: list[pa.Table]) -> ItemVectors:
    schema = _schema_of(new, found)
    rows = pa.concat_tables([t.select(KEYS + ["embedding"]).cast(schema) for t in [found, *new]])
    got = take_matching(keys, rows)
    if got.num_rows != keys.num_rows:
        raise DataError(f"text cache: {keys.num_rows - got.num_rows} item(s) have no embedding after encoding")
    return ItemVectors.from_table(got)


def _schema_of(new: list[pa.Table], found: pa.Table) -> pa.Schema:
    """A fixed-size embedding type shared by cached and new rows."""
    for t in new + [found]:
        if t.num_rows and pa.types.is_fixed_size_list(t.schema.field("embedding").type):
            return t.select(KEYS + ["embedding"]).schema
    return found.select(KEYS + ["embedding"]).schema


def encode_items(items: pa.Table, cfg: TextEncodeConfig | None = None, where: str = "items") -> EncodedItems:
    """Embed every (domain, item) text of `items` (columns domain, item_id, text), reusing the cache."""
    cfg = cfg or TextEncodeConfig()
    keys = item_keys(items, where)
    cache = TextCache(cfg.cache_dir, cfg.model, cfg.normalize)
    found, missing = cache.split(keys)
    new = []
    if missing.num_rows:
        enc = _Encoder(cfg.model, cfg.device, cfg.normalize, cfg.batch_size)
        new = [enc(missing)]
        cache.write_part(new[0])
    return EncodedItems(_finish(keys, found, new), missing.num_rows, found.num_rows)


def encode_items_ray(items: pa.Table, cfg: TextEncodeConfig | None = None, where: str = "items",
                     rows_per_task: int = 4096) -> EncodedItems:
    """As `encode_items`, with the cache misses encoded by a Ray Data actor pool (`cfg.num_actors`
    actors, each loading the model once) that writes its Parquet parts straight into the cache."""
    import ray.data

    cfg = cfg or TextEncodeConfig()
    keys = item_keys(items, where)
    cache = TextCache(cfg.cache_dir, cfg.model, cfg.normalize)
    found, missing = cache.split(keys)
    new: list[pa.Table] = []
    if missing.num_rows:
        # One partition per rows_per_task keys: enough tasks to keep every actor busy.
        missing = missing.sort_by([("text_hash", "ascending")])  # equal texts land in the same batch
        ds = ray.data.from_arrow(missing).repartition(max(1, -(-missing.num_rows // rows_per_task)))
        out = ds.map_batches(
            _Encoder, fn_constructor_kwargs=dict(model=cfg.model, device=cfg.device, normalize=cfg.normalize,
                                                 batch_size=cfg.batch_size),
            concurrency=cfg.num_actors, batch_size=rows_per_task, batch_format="pyarrow",
            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
        )
        cache.claim()
        tmp = f"{cache.root}/.ray-{uuid.uuid4().hex[:8]}"
        out.write_parquet(f"{cache.fs.unstrip_protocol(tmp)}")
        try:
            for p in sorted(cache.fs.find(tmp)):
                if p.endswith(".parquet"):
                    with cache.fs.open(p, "rb") as f:
                        new.append(pq.read_table(f))
                    cache.fs.mv(p, f"{cache.root}/{part_name()}")
        finally:
            if cache.fs.exists(tmp):
                cache.fs.rm(tmp, recursive=True)
    return EncodedItems(_finish(keys, found, new), missing.num_rows, found.num_rows)


# ---------------------------------------------------------------- the items side table of a job


def side_table_vectors(tables: dict[str, str], cfg: TextEncodeConfig, who: str) -> ItemVectors:
    """Text vectors of every (domain, item) of a job's `items` side table (`tables["items"]`: Parquet
    with columns item_id, domain, text), reusing the cache. `who` (e.g. "PreRec") names the reader
    in the error raised when the data has no such table."""
    url = tables.get("items")
    if not url:
        raise DataError(f"{who} needs item texts: the data has no 'items' side table (ModelData.tables['items'] "
                        f"with columns item_id, domain, text; tables: {sorted(tables) or 'none'})")
    items = read_dataset(url, "items", ["item_id", "domain", "text"])[1]
    return encode_items(items, cfg, where=url).vectors
