"""Driver-side data preparation for engine jobs: interactions -> a data recipe -> streamed training data.

In memory (`data.prepare=memory`, or `auto` below `data.memory_max_rows` interactions), the driver
loads the interactions once (a synthetic world, the shipped MovieLens, or any canonical
Parquet dataset) through the validated reader (`xdtrain.data.validate.read_dataset`: every file,
schema and row group checked, string ids hashed to int64), applies the duplicate policy
(`data.duplicates`) and the k-core (`data.k_core`), keeps the train domains, and runs the configured data recipe
(`xdtrain.data.recipes`, `data.recipe`): it splits the interactions, writes each training stream of
`data.streams` as Parquet row groups under `<run_dir>/data/<stream>` (the unit the workers'
streaming readers shard by) and returns the valid/test `EvalSet`s. The default (leave-one-out, one
stream "train" of `sequences` rows) is the engine's original protocol. Side tables the driver writes
itself go to `<run_dir>/data/side/<kind>`. With `data.prepare=ray` the same recipe runs as a Ray Data
pipeline over user partitions (`xdtrain.data.distributed`), giving the same outputs with driver
memory bounded by the catalogue. Either way the eval rows are written under `<run_dir>/data/eval`
and read back in chunks (`prepared_store`), and `<run_dir>/data/prepared.json`, written last, lets
a re-run with the same inputs and `data:` config reuse everything.

What every model may read (`ModelData`): the catalogue and eval domains, side tables by kind
(`items` with text, and `interactions`: every loaded interaction before `train_domains` filtering,
so a model can count a held-out domain's own popularity), and `extras["train_domains"]` (the
domains trained on), `extras["cache_dir"]` (a run-local cache folder, e.g. for text vectors) and
`extras["streams"]` (rows of each prepared dataset a stream may read; an empty one is not written).
Train sequences carry `items`, `timestamps` and `domains` (each item's domain) per user; eval
rows carry the target's `timestamp`, the `history_domains` of their cross-domain history, and the
flags `new_user`, `new_item`, `unseen` against the source domains (`data.source_domains`, by
default the train domains), for `eval.groups`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.config import load_config
from xdtrain.data.evalrows import with_seen_flags
from xdtrain.data.movielens import k_core
from xdtrain.data.recipes import InteractionsSource, RecipeConfig, get_recipe
from xdtrain.data.schemas import DataError, id_columns
from xdtrain.data.sequences import write_dataset, write_parquet
from xdtrain.data.validate import drop_duplicates, read_dataset, row_origin
from xdtrain.eval.candidates import EvalSet
from xdtrain.models import ModelData
from xdtrain.train.config import DataConfig
from xdtrain.train.prepared_store import (
    MANIFEST,
    input_fingerprint,
    load_manifest,
    read_catalogue,
    read_eval_set,
    save_manifest,
    write_catalogue,
)

COLUMNS = ["user_id", "item_id", "domain", "timestamp"]
LABEL_COLUMNS = ["label", "observed"]  # read too when the recipe writes the "labelled" stream


@dataclass
class PreparedData:
    train_url: str  # streams["train"]: Parquet dataset of the `sequences` table (raw item ids); "" without it
    model_data: ModelData
    valid: EvalSet
    test: EvalSet
    stats: dict
    streams: dict[str, str] = field(default_factory=dict)  # training stream name -> Parquet dataset URL
    stream_tables: dict[str, str] = field(default_factory=dict)  # stream name -> reader table kind


class Interactions(NamedTuple):
    table: pa.Table  # canonical columns (ids int64), duplicates handled by `data.duplicates`
    name: str  # names the data in messages
    tables: dict[str, str]  # side tables by kind
    duplicates: int  # exact duplicate rows found (dropped unless data.duplicates=keep)


def load_interactions(cfg: DataConfig, run_dir: Path) -> Interactions:
    """The configured source's interactions, validated, ids hashed, duplicates handled (see the module
    docstring). When that changed the rows, the `interactions` side table is the cleaned copy under
    `<run_dir>/data/side/interactions`, so that models read the rows the recipe split."""
    optional = LABEL_COLUMNS if "labelled" in cfg.streams else []
    origin = None
    changed = False
    if cfg.source == "synthetic":
        world = world_interactions(cfg, run_dir)
        ds, inter = read_dataset(f"{world}/interactions", "interactions", COLUMNS, optional)
        origin, changed = (lambda row: row_origin(ds, row)), _hashed(ds.schema)
        tables = {k: f"{world}/{k}" for k in ("interactions", "items", "users", "entities", "triplets", "links")}
        name = f"synthetic world {world}"
    elif cfg.source == "movielens":
        from xdtrain.data.movielens import MovieLensConfig, prepare

        ml = prepare(MovieLensConfig(dataset=cfg.dataset, domain_rule=cfg.domains, min_rating=cfg.min_rating,
                                     k_core=source_k_core(cfg), exclude_title_twins=cfg.exclude_title_twins,
                                     sequences="none"))
        items = write_dataset(ml.items.select(["item_id", "domain", "text"]), run_dir / "data" / "side" / "items")
        inter, name, tables = ml.interactions, cfg.dataset, {"items": items}
        inter = inter.select(COLUMNS + [c for c in optional if c in inter.column_names])
    elif cfg.source == "parquet":
        if not cfg.interactions_url:
            raise DataError("data.interactions_url: required when data.source is 'parquet'")
        ds, inter = read_dataset(cfg.interactions_url, "interactions", COLUMNS, optional)
        origin, changed = (lambda row: row_origin(ds, row)), _hashed(ds.schema)
        name, tables = cfg.interactions_url, {"interactions": cfg.interactions_url}
    elif cfg.source == "two_domain_csv":
        from xdtrain.data.two_domain import read_two_domain_csv, two_domain_interactions

        if not cfg.interactions_url or len(cfg.two_domain_names) != 2:
            raise DataError("data.interactions_url (the CSV) and data.two_domain_names (two names) are required "
                            "when data.source is 'two_domain_csv'")
        inter = two_domain_interactions(read_two_domain_csv(cfg.interactions_url), tuple(cfg.two_domain_names))
        inter = inter.select(COLUMNS + [c for c in optional if c in inter.column_names])
        name, tables = cfg.interactions_url, {}
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}; expected synthetic, movielens, parquet, "
                        "two_domain_csv or released")
    if "domain" in inter.column_names:  # dictionary or integer domain codes: plain text on both paths
        inter = inter.set_column(inter.column_names.index("domain"), "domain", pc.cast(inter["domain"], pa.string()))
    inter, dups = drop_duplicates(inter, cfg.duplicates, name, origin)
    if dups and cfg.duplicates == "drop":
        print(f"[xdtrain] warning: {name}: dropped {dups} exact duplicate interaction(s) of {inter.num_rows + dups} "
              "(data.duplicates=drop; 'keep' or 'error' to change)", file=sys.stderr)
        changed = True
    if cfg.source != "movielens" and source_k_core(cfg) > 1:  # MovieLens filters in its own preparation
        before = inter.num_rows
        inter = k_core(inter, source_k_core(cfg))[0]
        changed = changed or inter.num_rows < before
    if changed or "interactions" not in tables:
        tables["interactions"] = write_dataset(inter, run_dir / "data" / "side" / "interactions")
    return Interactions(inter, name, tables, dups)


def source_k_core(cfg: DataConfig) -> int:
    """`data.k_core`, with -1 meaning the source's default (5 for MovieLens, no filter otherwise)."""
    return cfg.k_core if cfg.k_core >= 0 else (5 if cfg.source == "movielens" else 0)


def _hashed(schema: pa.Schema) -> bool:
    """Whether reading hashed some string id column (the table differs from the files)."""
    return any(n in schema.names and not pa.types.is_integer(schema.field(n).type) for n in id_columns("interactions"))


def _keep_domains(inter: pa.Table, domains: list[str], key: str) -> pa.Table:
    if not domains:
        return inter
    present = set(pc.unique(inter["domain"]).to_pylist())
    unknown = sorted(set(domains) - present)
    if unknown:
        raise DataError(f"data.{key}: unknown domain(s) {unknown}; the data has {sorted(present)}")
    return inter.filter(pc.is_in(inter["domain"], pa.array(domains, inter["domain"].type)))


def recipe_config(cfg: DataConfig, min_groups: int = 1) -> RecipeConfig:
    """The data recipe the `data:` section configures (`min_groups`: row groups per stream, e.g. workers)."""
    return RecipeConfig(name=cfg.recipe, streams=list(cfg.streams), ratios=list(cfg.split_ratios),
                        times=list(cfg.split_times), seed=cfg.split_seed,
                        per_domain_catalogue=cfg.per_domain_catalogue, max_history=cfg.max_history,
                        rows_per_group=cfg.rows_per_group, flat_rows_per_group=cfg.flat_rows_per_group,
                        max_train_samples=cfg.max_train_samples, min_groups=min_groups)


def prepare_data(cfg: DataConfig, run_dir: str | Path, min_groups: int = 1,
                 connect: Callable[[], object] | None = None) -> PreparedData:
    """Load, filter domains, run the data recipe (split, write the streams); see the module docstring.
    A re-run with the same inputs and `data:` config reuses `<run_dir>/data` (`prepared_store`).
    `connect` joins Ray before the Ray Data path runs (default: an embedded local Ray)."""
    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    t0 = time.time()
    if cfg.recipe != "amid" and cfg.source != "released":
        recipe_config(cfg, min_groups).check()  # a bad recipe fails before any loading
    if cfg.source == "synthetic":
        world_interactions(cfg, run_dir)  # generated first: the fingerprint lists its files
    key = input_fingerprint(cfg, run_dir, min_groups)
    rec = load_manifest(data_dir, key) if cfg.reuse_prepared else None
    if rec is not None:
        print(f"[xdtrain] data: reusing {data_dir} (inputs and data config unchanged)", flush=True)
        rec["stats"]["reused"] = True  # prepare_seconds is the original preparation's
        return _assemble(rec, cfg, data_dir)
    (data_dir / MANIFEST).unlink(missing_ok=True)  # what follows rewrites files the old one names
    if cfg.recipe == "amid" or cfg.source == "released":
        rec = _prepare_amid(cfg, run_dir, min_groups)
    elif use_distributed(cfg, run_dir, min_groups):
        if connect is not None:
            connect()
        rec = _prepare_ray(cfg, run_dir, min_groups)
    else:
        rec = _prepare_memory(cfg, run_dir, min_groups)
    rec["stats"]["prepare_seconds"] = round(time.time() - t0, 1)
    save_manifest(data_dir, key, rec)
    return _assemble(rec, cfg, data_dir)


def world_interactions(cfg: DataConfig, run_dir: Path) -> str:
    """The synthetic world's folder: `data.world_url`, else generated into `<run_dir>/world` once."""
    world = cfg.world_url
    if not world:
        from xdtrain.data.synthetic import WorldConfig, generate_world

        world = str(run_dir / "world")
        if not (Path(world) / "world.json").exists():
            wcfg = load_config(WorldConfig, cfg.world_config, ["output.overwrite=true", f"out={world}"])
            print(f"[xdtrain] generating the synthetic world ({cfg.world_config}) into {world}", flush=True)
            generate_world(wcfg, world, progress=False)
    return world


def use_distributed(cfg: DataConfig, run_dir: Path, min_groups: int = 1) -> bool:
    """Whether the recipe runs as a Ray Data pipeline (`data.prepare`; auto: a big Parquet log)."""
    from xdtrain.data.distributed import check_distributable

    why = check_distributable(recipe_config(cfg, min_groups), cfg.overlap_rate)
    if cfg.source not in ("synthetic", "parquet"):
        why = f"data.source {cfg.source!r} (read in one process)"
    if cfg.prepare == "ray" and why:
        raise DataError(f"data.prepare=ray: {why} cannot run distributed; use data.prepare=memory or auto")
    if cfg.prepare != "auto" or why:
        return cfg.prepare == "ray"
    from xdtrain.data.validate import open_dataset

    return open_dataset(_log_url(cfg, run_dir), "interactions", COLUMNS).num_rows > cfg.memory_max_rows


def _log_url(cfg: DataConfig, run_dir: Path) -> str:
    if cfg.source == "parquet":
        if not cfg.interactions_url:
            raise DataError("data.interactions_url: required when data.source is 'parquet'")
        return cfg.interactions_url
    return f"{world_interactions(cfg, run_dir)}/interactions"


def _prepare_memory(cfg: DataConfig, run_dir: Path, min_groups: int) -> dict:
    rcfg = recipe_config(cfg, min_groups)
    rcfg.check()  # a bad recipe fails before any loading
    recipe = get_recipe(rcfg.name)
    inter, name, tables, dups = load_interactions(cfg, run_dir)
    # Users and items of the source domains, before train_domains filtering: a held-out domain's
    # users/items are "seen" when they occur in any source domain (paper sec. 4.1, code get_many).
    source = _keep_domains(inter, cfg.source_domains or cfg.train_domains,
                           "source_domains" if cfg.source_domains else "train_domains")
    source_users, source_items = (pc.unique(source[c]).to_numpy() for c in ("user_id", "item_id"))
    del source
    inter = _keep_domains(inter, cfg.train_domains, "train_domains")
    if cfg.overlap_rate >= 0:
        from xdtrain.data.two_domain import resample_overlap

        inter = resample_overlap(inter, cfg.overlap_rate, cfg.overlap_reference, cfg.overlap_seed)
    if inter.num_rows == 0:
        raise DataError(f"{name}: no interactions left after filtering")
    out = recipe.prepare(InteractionsSource(name, inter, tables=tables), rcfg, run_dir / "data")
    valid, test = (EvalSet(with_seen_flags(s.rows, source_users, source_items), s.catalogue, s.item_counts,
                           name=s.name, history_column=s.history_column) for s in (out.valid, out.test))
    stats = {**out.stats, "duplicates": dups, "source": name, "prepared_by": "memory"}
    return _record(run_dir / "data", out, valid, test, tables, stats, True,
                   {"train_domains": sorted(pc.unique(inter["domain"]).to_pylist())})


def _prepare_ray(cfg: DataConfig, run_dir: Path, min_groups: int) -> dict:
    from xdtrain.data.distributed import DistributedInput, prepare_distributed

    url = _log_url(cfg, run_dir)
    if cfg.source == "synthetic":
        world = url.rsplit("/", 1)[0]
        name = f"synthetic world {world}"
        tables = {k: f"{world}/{k}" for k in ("interactions", "items", "users", "entities", "triplets", "links")}
    else:
        name, tables = url, {"interactions": url}
    src = DistributedInput(url, name, optional=tuple(LABEL_COLUMNS if "labelled" in cfg.streams else ()),
                           duplicates=cfg.duplicates, k_core=source_k_core(cfg),
                           train_domains=tuple(cfg.train_domains), source_domains=tuple(cfg.source_domains),
                           partition_rows=cfg.partition_rows, tables=tables)
    data_dir = run_dir / "data"
    out = prepare_distributed(src, recipe_config(cfg, min_groups), data_dir)
    if out.interactions_url:
        tables["interactions"] = out.interactions_url
    for part in ("valid", "test"):
        write_catalogue(out.catalogue, out.item_counts, data_dir, part)
    write_parquet(pa.table({"item_id": pa.array(out.item_ids, pa.int64())}), data_dir / "eval" / "item_ids.parquet")
    stats = {**out.stats, "source": name, "prepared_by": "ray"}
    return {**_stream_record(out.streams), "stats": stats, "tables": tables,
            "names": {p: f"{name} {p}" for p in ("valid", "test")}, "history_column": "history",
            "counts": True, "subset": True, "model_domains": None, "item_domains": None, "sorted_eval": True,
            "extras": {"train_domains": sorted(out.catalogue)}}


def _record(data_dir: Path, out, valid: EvalSet, test: EvalSet, tables: dict, stats: dict, subset: bool,
            extras: dict, model_domains: list[str] | None = None, item_domains: list[str] | None = None) -> dict:
    """Write the eval sets (and the catalogue) of an in-memory preparation; its manifest record."""
    for part, s in (("valid", valid), ("test", test)):
        write_dataset(s.rows, data_dir / "eval" / part, 65536, only_file=True)
        write_catalogue(s.catalogue, s.item_counts, data_dir, part)
    write_parquet(pa.table({"item_id": pa.array(np.asarray(out.item_ids), pa.int64())}),
                  data_dir / "eval" / "item_ids.parquet")
    return {**_stream_record(out.streams), "stats": stats, "tables": tables,
            "names": {"valid": valid.name, "test": test.name}, "history_column": valid.history_column,
            "catalogue_domains": {"valid": sorted(valid.catalogue), "test": sorted(test.catalogue)},
            "counts": valid.item_counts is not None, "subset": bool(subset), "model_domains": model_domains,
            "item_domains": item_domains, "sorted_eval": False, "extras": extras}


def _stream_record(streams: dict) -> dict:
    return {"streams": {k: v.url for k, v in streams.items()},
            "stream_tables": {k: v.table for k, v in streams.items()},
            "stream_rows": {k: v.rows for k, v in streams.items()}}


def _assemble(rec: dict, cfg: DataConfig, data_dir: Path) -> PreparedData:
    """The `PreparedData` of a manifest record: eval sets read back (eval_domains, user sample)."""
    sets = []
    for part in ("valid", "test"):
        catalogue, counts = read_catalogue(data_dir, part, rec.get("catalogue_domains", {}).get(part))
        sets.append(read_eval_set(data_dir / "eval" / part, catalogue, counts if rec["counts"] else None,
                                  rec["names"][part], cfg.eval_domains if rec["subset"] else [],
                                  cfg.eval_user_fraction, cfg.split_seed, rec["sorted_eval"], rec["history_column"]))
    valid, test = sets
    domains = rec["model_domains"] or sorted(valid.catalogue)
    item_domains = {d: valid.catalogue[d] for d in (rec["item_domains"] or domains)}
    item_ids = pq.read_table(data_dir / "eval" / "item_ids.parquet")["item_id"].to_numpy()
    extras = {**rec["extras"], "cache_dir": str(data_dir.parent / "cache"), "streams": dict(rec["stream_rows"])}
    model_data = ModelData(item_ids=item_ids, domains=domains, item_domains=item_domains, tables=dict(rec["tables"]),
                           extras=extras)
    streams = dict(rec["streams"])
    return PreparedData(streams.get("train", ""), model_data, valid, test, dict(rec["stats"]), streams,
                        dict(rec["stream_tables"]))


def amid_config(cfg: DataConfig, min_groups: int = 1):
    """The AMID rows config of the `data:` section: domains from train_domains (two), else data.pair."""
    from xdtrain.data.amid_rows import AmidDataConfig

    if cfg.recipe != "amid":
        raise DataError(f"data.source 'released' needs data.recipe 'amid', got {cfg.recipe!r}")
    domains = list(cfg.train_domains) or [d for d in cfg.pair.split("_") if d]
    if len(domains) != 2:
        raise DataError(f"data.pair: expected '<domain 1>_<domain 2>' (or two data.train_domains), got {cfg.pair!r}")
    return AmidDataConfig((domains[0], domains[1]), k_u=cfg.k_u, mnar=cfg.mnar, test_ratio=cfg.test_ratio,
                          valid_ratio=cfg.valid_ratio, min_seq=cfg.amid_min_seq, hide_other=cfg.hide_other,
                          seed=cfg.split_seed, rows_per_group=cfg.rows_per_group, min_groups=min_groups)


def _prepare_amid(cfg: DataConfig, run_dir: Path, min_groups: int) -> dict:
    """Recipe `amid` (xdtrain/data/amid_rows.py): two-domain rows from the released CSVs or from
    canonical logs, streams O and D; the model's domains are the pair's."""
    from xdtrain.data.amid_rows import RELEASED

    rcfg = replace(recipe_config(cfg, min_groups), amid=amid_config(cfg, min_groups))
    if cfg.source == "released":
        if not cfg.released_dir or not cfg.pair:
            raise DataError("data.released_dir and data.pair: both required when data.source is 'released'")
        source = InteractionsSource(cfg.released_dir, tables={RELEASED: f"{cfg.released_dir}/{cfg.pair}"})
    else:
        inter, name, tables, _ = load_interactions(cfg, run_dir)
        source = InteractionsSource(name, inter, tables=tables)
    out = get_recipe(rcfg.name).prepare(source, rcfg, run_dir / "data")
    domains = list(rcfg.amid.domains)
    tables = {k: v for k, v in source.tables.items() if k != RELEASED}
    stats = {**out.stats, "source": source.name, "prepared_by": "memory"}
    return _record(run_dir / "data", out, out.valid, out.test, tables, stats, False, {"train_domains": domains},
                   model_domains=domains, item_domains=sorted(out.valid.catalogue))


def eval_subset(data: EvalSet, domains: list[str]) -> EvalSet:
    rows = data.rows.filter(pc.is_in(data.rows["domain"], pa.array(domains, pa.string())))
    if rows.num_rows == 0:
        raise DataError(f"data.eval_domains: no eval rows in {domains} ({data.name})")
    keep = {d: data.catalogue[d] for d in domains if d in data.catalogue}
    counts = {d: data.item_counts[d] for d in keep} if data.item_counts else None
    return EvalSet(rows, keep, counts, name=data.name, history_column=data.history_column)


def train_rows_per_rank(url: str, world_size: int, table: str = "sequences") -> list[int]:
    """Rows each rank's streaming reader will see per epoch (from footers only)."""
    from xdtrain.data.reader import list_units, shard_units

    units = list_units(url, table)
    return [sum(u.num_rows for u in shard_units(units, world_size, r)) for r in range(world_size)]


def catalogue_size(data: PreparedData) -> int:
    return int(np.asarray(data.model_data.item_ids).size)
