"""The data recipes as a Ray Data pipeline: driver memory bounded by the catalogue, never by the log.

`prepare_distributed` gives what `LocalRecipe` gives (the same streams, eval rows and catalogues; a
test holds the two paths to identical outputs) for a log at any fsspec URL, in passes over user
partitions. No process holds more than one partition or one row group of the log:

  1. shuffle   every row group of the log is read and checked as `read_dataset` reads it (file, row
               group and row named on bad input; string ids hashed), and its rows are written to one
               of P partitions by a hash of `user_id` (`<work>/shuffle/p=<j>/`): afterwards each user's
               interactions are in one partition, so every per-user step below is partition-local.
  2. clean     each partition: exact duplicates dropped (`duplicates`), written as one file; the
               driver adds up item counts (catalogue-sized).
  3. k-core    (`k_core` > 1) each pass keeps, per partition, the rows of the current item set whose
               user still has >= k of them, and counts items; the item set is iterated to its fixed
               point (the k-core is unique, so this is the in-memory `k_core`'s result).
  4. cuts      (chronological by ratios) the exact global cut times (`exact_rank`): histograms of the timestamps,
               refined until the rank's bin is small enough to collect.
  5. split     each partition runs the in-memory split (`split_interactions`) and stream builders
               (`stream_tables`) on its users and writes its part of every stream (`<out>/<stream>/
               part-<j>.parquet`) and of the eval rows (`<out>/eval/<valid|test>/`); the driver merges
               catalogue pairs and train counts and writes the `items` stream.

Recipes that need the whole log at once are refused (`DataError`): `amid`, overlap-rate resampling
and `max_train_samples` (a seeded order over every user); `prepare_data` runs those in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.evalrows import with_seen_flags
from xdtrain.data.exact_rank import cut_values, to_key
from xdtrain.data.partition_map import carry_errors, partition_map, ray_map
from xdtrain.data.recipes import (
    STREAMS,
    InteractionsSource,
    RecipeConfig,
    StreamData,
    check_eval_rows,
    group_rows,
    items_table,
    split_interactions,
    stream_tables,
)
from xdtrain.data.schemas import DataError, hash_id_columns
from xdtrain.data.sequences import write_parquet
from xdtrain.data.splits import splitmix64
from xdtrain.data.validate import drop_duplicates, open_dataset, read_unit
from xdtrain.outputs import pid_alive

COLUMNS = ["user_id", "item_id", "domain", "timestamp"]
SCRATCH_MARK = "preparing.json"
_NO_COUNTS = (np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass
class DistributedInput:
    url: str  # canonical interactions (Parquet dataset, any fsspec URL)
    name: str  # names the data in messages
    optional: tuple[str, ...] = ()  # label / observed, read where present
    duplicates: str = "drop"
    k_core: int = 0
    train_domains: tuple[str, ...] = ()
    source_domains: tuple[str, ...] = ()  # 'seen' flags against these (empty: train_domains, else all)
    partition_rows: int = 4_000_000  # interactions per user partition (P = ceil(rows / this))
    tables: dict | None = None  # side tables by kind (items, users) for the items / labelled streams


@dataclass
class DistributedOutput:
    streams: dict[str, StreamData]
    eval_dirs: dict[str, str]  # valid / test -> folder of eval-row files (sorted by user on read)
    catalogue: dict[str, np.ndarray]
    item_counts: dict[str, np.ndarray]
    item_ids: np.ndarray
    stats: dict
    interactions_url: str  # the cleaned log ("" when it equals the input)


def check_distributable(cfg: RecipeConfig, overlap_rate: float = -1.0) -> str:
    """Why `cfg` cannot run distributed ("" when it can)."""
    if cfg.name == "amid":
        return "recipe 'amid' (K_u subsampling draws over every row)"
    if overlap_rate >= 0:
        return "data.overlap_rate (resampling draws over every user)"
    if cfg.max_train_samples:
        return "data.max_train_samples (a seeded order over every user)"
    return ""


def prepare_distributed(src: DistributedInput, cfg: RecipeConfig, out_dir: str | Path) -> DistributedOutput:
    """Run recipe `cfg` on `src` as described in the module docstring; outputs under `out_dir`."""
    import ray

    cfg.check()
    why = check_distributable(cfg)
    if why:
        raise DataError(f"{src.name}: {why} needs the whole log in one process; use data.prepare=memory")
    if not ray.is_initialized():
        from xdtrain.localray import init_local

        init_local(include_dashboard=False, log_to_driver=False)
    out_dir = Path(out_dir)
    _remove_dead_scratch(out_dir)
    work = _scratch(out_dir, "work")
    try:
        return _run(src, cfg, out_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # made here, under a fresh name


def _scratch(out_dir: Path, kind: str) -> Path:
    """A fresh scratch folder `<out_dir>/.<kind>-<tag>`, marked with this process's host and pid."""
    path = out_dir / f".{kind}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    (path / SCRATCH_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return path


def _remove_dead_scratch(out_dir: Path) -> None:
    """Scratch folders a dead preparation on this host left (its mark says so); nothing else."""
    for path in list(out_dir.glob(".work-*")) + list(out_dir.glob(".stage-*")):
        try:
            mark = json.loads((path / SCRATCH_MARK).read_text())
        except (OSError, ValueError):
            continue
        if mark.get("host") == socket.gethostname() and not pid_alive(mark.get("pid")):
            shutil.rmtree(path, ignore_errors=True)


def _run(src: DistributedInput, cfg: RecipeConfig, out_dir: Path, work: Path) -> DistributedOutput:
    ds = open_dataset(src.url, "interactions", COLUMNS, optional=src.optional)
    n_parts = max(1, math.ceil(ds.num_rows / max(1, src.partition_rows)))
    hashed = any(not pa.types.is_integer(ds.schema.field(c).type) for c in ("user_id", "item_id"))
    stats: dict = {"partitions": n_parts, "log_rows": ds.num_rows}
    schema = pa.schema([pa.field(f.name, pa.int64() if f.name in ("user_id", "item_id") else
                                 pa.string() if f.name == "domain" else f.type) for f in ds.schema])

    # 1. shuffle by user
    @carry_errors({"rows": np.zeros((1, n_parts), np.int64)})
    def shuffle(batch: dict) -> dict:
        for i in batch["unit"]:
            rows = hash_id_columns(pa.Table.from_batches([read_unit(ds, ds.units[int(i)])]), "interactions")
            rows = rows.set_column(rows.column_names.index("domain"), "domain", pc.cast(rows["domain"], pa.string()))
            part = (splitmix64(rows["user_id"].to_numpy().astype(np.uint64)) % np.uint64(n_parts)).astype(np.int64)
            for j in np.unique(part):
                write_parquet(rows.filter(pa.array(part == j)), work / "shuffle" / f"p={j}" / f"u{int(i):06d}.parquet")
        return {"rows": np.bincount(part, minlength=n_parts)[None, :]}

    written = np.zeros(n_parts, np.int64)
    for r in ray_map([{"unit": i} for i in range(len(ds.units))], shuffle, "shuffle by user", batch=True):
        written += r["rows"]

    # 2. clean: duplicates
    def clean(j: int) -> dict:
        folder = work / "shuffle" / f"p={j}"
        t = pq.read_table(folder, schema=schema) if folder.exists() else schema.empty_table()
        if t.num_rows != written[j]:  # another node's files are not visible here
            raise DataError(f"{folder}: {t.num_rows} rows where the shuffle wrote {written[j]}; on a cluster "
                            "run_dir must be on storage every node reads")
        t, dups = drop_duplicates(t, src.duplicates, f"{src.name} (user partition {j})")
        write_parquet(t, work / "clean" / f"p={j}.parquet")
        return {"dups": dups, "counts": _item_counts(t), "rows": t.num_rows}

    counts, stats["duplicates"], rows_clean = _NO_COUNTS, 0, 0
    for r in partition_map(n_parts, clean, "drop duplicates"):
        counts = _merge_counts([counts, r["counts"]])  # folded as they come: catalogue-sized
        stats["duplicates"] += r["dups"]
        rows_clean += r.get("rows", 0)

    # 3. k-core, to its fixed point
    kept = None
    if src.k_core > 1:
        kept, passes = counts[0][counts[1] >= src.k_core], 0
        while True:
            passes += 1
            k_items = pa.array(kept, pa.int64())
            got = partition_map(n_parts, lambda j, k_items=k_items: {
                "counts": _item_counts(_core(_clean(work, j), k_items, src.k_core))}, f"k-core pass {passes}")
            counts = _merge_counts(r["counts"] for r in got)
            new = counts[0][counts[1] >= src.k_core]
            if np.array_equal(new, kept):
                break
            kept = new
        stats["k_core_passes"] = passes
    kept_items = None if kept is None else pa.array(kept, pa.int64())

    def filtered(j: int) -> pa.Table:
        return _core(_clean(work, j), kept_items, src.k_core)

    # source items ('seen' flags) and the train domains
    source_doms = list(src.source_domains or src.train_domains)
    present_set, source_items, kept_rows = set(), np.zeros(0, np.int64), 0
    for r in partition_map(n_parts, lambda j: _domain_summary(filtered(j), source_doms), "catalogue"):
        present_set |= r["domains"]
        source_items = np.union1d(source_items, r["source_items"])
        kept_rows += r["rows"]
    present = sorted(present_set)
    for key, doms in (("source_domains" if src.source_domains else "train_domains", source_doms),
                      ("train_domains", list(src.train_domains))):
        unknown = sorted(set(doms) - set(present))
        if unknown:
            raise DataError(f"data.{key}: unknown domain(s) {unknown}; the data has {present}")
    changed = hashed or stats["duplicates"] > 0 or kept_rows < rows_clean

    # 4. chronological cut times from the ratios
    part_cfg = cfg
    if cfg.name == "chronological" and not cfg.times:
        like = "int" if pa.types.is_integer(schema.field("timestamp").type) else "float"
        cuts = cut_values(n_parts, lambda j: _timestamps(filtered(j), src.train_domains), cfg.ratios, like)
        part_cfg = replace(cfg, cut_values=cuts)

    # 5. split each partition, write its part of every stream and of the eval rows
    names = [s for s in cfg.streams if s != "items"]
    groups_per_part = max(1, math.ceil(cfg.min_groups / n_parts))
    stage = _scratch(out_dir, "stage")

    def split_part(j: int) -> dict:
        t = filtered(j)
        if changed:
            write_parquet(t, stage / "side_interactions" / f"part-{j:05d}.parquet")
        src_users = pc.unique(_keep(t, source_doms)["user_id"]).to_numpy()
        t = _keep(t, list(src.train_domains))
        if t.num_rows == 0:
            return {"empty": True}
        split = split_interactions(t, part_cfg, src.name)
        for part, rows in split.eval_rows(cfg.max_history).items():
            rows = with_seen_flags(rows, src_users, source_items)
            write_parquet(rows, stage / "eval" / part / f"part-{j:05d}.parquet", row_group_size=65536)
        tables, more = stream_tables(split, InteractionsSource(src.name, tables=dict(src.tables or {})),
                                     replace(cfg, min_groups=groups_per_part), names)
        written = {}
        for key, (name, table, group) in tables.items():
            if table.num_rows:
                write_parquet(table, stage / key / f"part-{j:05d}.parquet", row_group_size=max(1, group))
                written[key] = (name, table.num_rows)
        train = np.zeros(split.rows.num_rows, np.int64)
        train[split.part == 0] = 1
        # (domain, item) pairs of the catalogue with their train counts
        items = pa.table({"domain": pc.cast(split.rows["domain"], pa.string()),
                          "item_id": pc.cast(split.rows["item_id"], pa.int64()), "train": train})
        return {"empty": False, "stats": {**split.stats, **more}, "written": written,
                "first": {p: _first_time(split, p) for p in (1, 2)},
                "items": items.group_by(["domain", "item_id"]).aggregate([("train", "sum")]).rename_columns(
                    ["domain", "item_id", "train"])}

    try:
        got, pairs = [], None
        for r in partition_map(n_parts, split_part, f"split ({cfg.name})"):
            if not r["empty"]:  # folded as they come: the driver holds one catalogue's worth of pairs
                pairs = r.pop("items") if pairs is None else pa.concat_tables([pairs, r.pop("items")]).group_by(
                    ["domain", "item_id"]).aggregate([("train", "sum")]).rename_columns(["domain", "item_id", "train"])
                got.append(r)
        if not got:
            raise DataError(f"{src.name}: no interactions left after filtering")
        merged = _merge_stats([r["stats"] for r in got])
        for part in ("valid", "test"):
            check_eval_rows(merged, part, src.name, cfg.name)
        pairs = pairs.sort_by([("domain", "ascending"), ("item_id", "ascending")])
        item_ids = np.unique(pairs["item_id"].to_numpy())
        domains = sorted(pc.unique(pairs["domain"]).to_pylist())
        by_domain = {d: pairs.filter(pc.equal(pairs["domain"], d)) for d in domains}
        catalogue = {d: (by_domain[d]["item_id"].to_numpy() if cfg.per_domain_catalogue else item_ids)
                     for d in domains}
        item_counts = {d: _align_counts(by_domain[d], catalogue[d]) for d in domains}
        merged.update(items=len(item_ids), recipe=cfg.name)
        if "row_group_rows" in merged:  # what the in-memory path's one file would use
            merged["row_group_rows"] = group_rows(merged["train_sequences"], cfg.rows_per_group, cfg.min_groups)
        if "items" in cfg.streams:
            merged["items_rows"] = pairs.num_rows
        if cfg.name == "chronological":
            merged["cut_times"] = list(cfg.times) if cfg.times else [
                min((r["first"][p] for r in got if r["first"][p] is not None), default=None) for p in (1, 2)]
        streams = _commit(stage, out_dir, got, cfg, src, pairs, n_parts)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    side = str(out_dir / "side_interactions") if changed else ""
    return DistributedOutput(streams, {p: str(out_dir / "eval" / p) for p in ("valid", "test")}, catalogue,
                             item_counts, item_ids, {**stats, **merged}, side)


def _commit(stage: Path, out_dir: Path, got: list[dict], cfg: RecipeConfig, src: DistributedInput,
            pairs: pa.Table, n_parts: int) -> dict[str, StreamData]:
    """Move the staged streams and eval rows into `out_dir` (each folder replaced whole); the items stream."""
    rows: dict[str, list] = {}
    for r in got:
        for key, (name, n) in r["written"].items():
            rows.setdefault(key, [name, 0])[1] += n
    for name in cfg.streams:
        if name in ("overlap", "by_domain", "items"):
            continue
        if name not in rows:
            raise DataError(f"{src.name}: recipe {cfg.name!r} leaves stream {name!r} empty")
    if "items" in cfg.streams:
        table = items_table(pairs, InteractionsSource(src.name, tables=dict(src.tables or {})))
        write_parquet(table, stage / "items" / "part-00000.parquet",
                      row_group_size=group_rows(table.num_rows, cfg.flat_rows_per_group, cfg.min_groups))
        rows["items"] = ["items", table.num_rows]
    for key in list(rows) + ["eval", "side_interactions"]:
        if (stage / key).exists():
            _replace_dir(stage / key, out_dir / key)
    group = {"items": cfg.flat_rows_per_group, "labelled": cfg.flat_rows_per_group}
    return {key: StreamData(str(out_dir / key), STREAMS[name], n, group.get(name, cfg.rows_per_group))
            for key, (name, n) in rows.items()}


def _replace_dir(new: Path, dst: Path) -> None:
    """Swap `new` in as `dst`. An existing `dst` goes only if it holds nothing but Parquet files (a
    previous preparation's output of the same name); anything else is refused and left untouched."""
    if dst.exists():
        other = [p for p in dst.rglob("*") if p.is_file() and p.suffix != ".parquet"]
        if other or not dst.is_dir():
            raise DataError(f"{dst}: holds {other[0] if other else 'a file'}, not prepared data; "
                            "it is left untouched: move it away or choose another run_dir")
        shutil.rmtree(dst)
    new.rename(dst)


# ---------------------------------------------------------------- partition-local steps


def _clean(work: Path, j: int) -> pa.Table:
    return pq.read_table(work / "clean" / f"p={j}.parquet")


def _core(t: pa.Table, items: pa.Array | None, k: int) -> pa.Table:
    """Rows of `items` whose user has >= k of them (`items` None: every row)."""
    if items is None or k <= 1 or t.num_rows == 0:
        return t
    t = t.filter(pc.is_in(t["item_id"], value_set=items))
    _, inv, cnt = np.unique(t["user_id"].to_numpy(), return_inverse=True, return_counts=True)
    return t.filter(pa.array(cnt[inv] >= k))


def _keep(t: pa.Table, domains: list[str]) -> pa.Table:
    if not domains or t.num_rows == 0:
        return t
    return t.filter(pc.is_in(pc.cast(t["domain"], pa.string()), pa.array(domains, pa.string())))


def _item_counts(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids, cnt = np.unique(np.asarray(t["item_id"].to_numpy(), np.int64), return_counts=True)
    return ids, cnt.astype(np.int64)


def _domain_summary(t: pa.Table, source_domains: list[str]) -> dict:
    doms = pc.unique(pc.cast(t["domain"], pa.string())).to_pylist() if t.num_rows else []
    return {"domains": set(doms), "rows": t.num_rows,
            "source_items": pc.unique(_keep(t, source_domains)["item_id"]).to_numpy().astype(np.int64)}


def _timestamps(t: pa.Table, domains: tuple[str, ...]) -> np.ndarray:
    """Order-preserving int64 keys of the timestamps (`_to_key`)."""
    return to_key(np.asarray(_keep(t, list(domains))["timestamp"].to_numpy()))


def _first_time(split, part: int) -> float | None:
    ts = np.asarray(split.rows["timestamp"].to_numpy())[split.part >= part]
    return ts.min().item() if len(ts) else None


# ---------------------------------------------------------------- the driver's merges


def _merge_counts(results: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    ids, cnt = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for i, c in results:
        allids = np.concatenate([ids, i])
        ids, inv = np.unique(allids, return_inverse=True)
        cnt = np.bincount(inv, weights=np.concatenate([cnt, c]), minlength=len(ids)).astype(np.int64)
    return ids, cnt


def _merge_stats(parts: list[dict]) -> dict:
    """Counts add up (per key for dict-valued ones); anything else is the partitions' (first) value."""
    out: dict = {}
    for s in parts:
        for k, v in s.items():
            if isinstance(v, bool) or not isinstance(v, (int, dict)):
                out.setdefault(k, v)
            elif isinstance(v, dict):
                d = out.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            else:
                out[k] = out.get(k, 0) + v
    return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in out.items()}


def _align_counts(pairs: pa.Table, catalogue: np.ndarray) -> np.ndarray:
    """Train counts of one domain's (item_id, train) pairs, aligned with its (sorted) catalogue."""
    ids, counts = pairs["item_id"].to_numpy(), pairs["train"].to_numpy()
    out = np.zeros(len(catalogue), np.int64)
    out[np.searchsorted(catalogue, ids)] = counts  # every pair's item is in its domain's catalogue
    return out
