"""Driver-side data preparation for engine jobs: interactions -> a data recipe -> streamed training data.

The driver loads the interactions once (a synthetic world, the shipped MovieLens, or any canonical
Parquet dataset) through the validated reader (`xdtrain.data.validate.read_dataset`: every file,
schema and row group checked, string ids hashed to int64), applies the duplicate policy
(`data.duplicates`), keeps the train domains, and runs the configured data recipe
(`xdtrain.data.recipes`, `data.recipe`): it splits the interactions, writes each training stream of
`data.streams` as Parquet row groups under `<run_dir>/data/<stream>` (the unit the workers'
streaming readers shard by) and returns the valid/test `EvalSet`s. The default (leave-one-out, one
stream "train" of `sequences` rows) is the engine's original protocol. Side tables the driver writes
itself go to `<run_dir>/data/side/<kind>`.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.config import load_config
from xdtrain.data.evalrows import with_seen_flags
from xdtrain.data.recipes import InteractionsSource, RecipeConfig, get_recipe
from xdtrain.data.schemas import DataError, id_columns
from xdtrain.data.sequences import write_dataset
from xdtrain.data.validate import drop_duplicates, read_dataset, row_origin
from xdtrain.eval.candidates import EvalSet
from xdtrain.models import ModelData
from xdtrain.train.config import DataConfig

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
        world = cfg.world_url
        if not world:
            from xdtrain.data.synthetic import WorldConfig, generate_world

            world = str(run_dir / "world")
            if not (Path(world) / "world.json").exists():
                wcfg = load_config(WorldConfig, cfg.world_config, ["output.overwrite=true", f"out={world}"])
                print(f"[xdtrain] generating the synthetic world ({cfg.world_config}) into {world}", flush=True)
                generate_world(wcfg, world, progress=False)
        ds, inter = read_dataset(f"{world}/interactions", "interactions", COLUMNS, optional)
        origin, changed = (lambda row: row_origin(ds, row)), _hashed(ds.schema)
        tables = {k: f"{world}/{k}" for k in ("interactions", "items", "users", "entities", "triplets", "links")}
        name = f"synthetic world {world}"
    elif cfg.source == "movielens":
        from xdtrain.data.movielens import MovieLensConfig, prepare

        ml = prepare(MovieLensConfig(dataset=cfg.dataset, domain_rule=cfg.domains, min_rating=cfg.min_rating,
                                     k_core=cfg.k_core, exclude_title_twins=cfg.exclude_title_twins,
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
    inter, dups = drop_duplicates(inter, cfg.duplicates, name, origin)
    if dups and cfg.duplicates == "drop":
        print(f"[xdtrain] warning: {name}: dropped {dups} exact duplicate interaction(s) of {inter.num_rows + dups} "
              "(data.duplicates=drop; 'keep' or 'error' to change)", file=sys.stderr)
        changed = True
    if changed or "interactions" not in tables:
        tables["interactions"] = write_dataset(inter, run_dir / "data" / "side" / "interactions")
    return Interactions(inter, name, tables, dups)


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


def prepare_data(cfg: DataConfig, run_dir: str | Path, min_groups: int = 1) -> PreparedData:
    """Load, filter domains, run the data recipe (split, write the streams); see the module docstring."""
    run_dir = Path(run_dir)
    t0 = time.time()
    if cfg.recipe == "amid" or cfg.source == "released":
        return _prepare_amid(cfg, run_dir, min_groups, t0)
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
    if cfg.eval_domains:
        valid, test = (eval_subset(s, cfg.eval_domains) for s in (valid, test))
    domains = sorted(valid.catalogue)
    model_data = ModelData(
        item_ids=out.item_ids, domains=domains,
        item_domains={d: valid.catalogue[d] for d in domains}, tables=tables,
        extras={"train_domains": sorted(pc.unique(inter["domain"]).to_pylist()),
                "cache_dir": str(run_dir / "cache"),
                "streams": {k: v.rows for k, v in out.streams.items()}},
    )
    stats = {**out.stats, "duplicates": dups, "prepare_seconds": round(time.time() - t0, 1), "source": name}
    streams = {k: v.url for k, v in out.streams.items()}
    return PreparedData(streams.get("train", ""), model_data, valid, test, stats, streams,
                        {k: v.table for k, v in out.streams.items()})


def amid_config(cfg: DataConfig, min_groups: int = 1):
    """The AMID rows config of the `data:` section: domains from train_domains (two), else data.pair."""
    from xdtrain.data.amid_rows import AmidDataConfig

    if cfg.recipe != "amid":
        raise DataError(f"data.source 'released' needs data.recipe 'amid', got {cfg.recipe!r}")
    domains = list(cfg.train_domains) or [d for d in cfg.pair.split("_") if d]
    if len(domains) != 2:
        raise DataError(f"data.pair: expected '<domain 1>_<domain 2>' (or two data.train_domains), got {cfg.pair!r}")
    return AmidDataConfig((domains[0], domains[1]), k_u=cfg.k_u, test_ratio=cfg.test_ratio,
                          valid_ratio=cfg.valid_ratio, min_seq=cfg.amid_min_seq, hide_other=cfg.hide_other,
                          seed=cfg.split_seed, rows_per_group=cfg.rows_per_group, min_groups=min_groups)


def _prepare_amid(cfg: DataConfig, run_dir: Path, min_groups: int, t0: float) -> PreparedData:
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
    model_data = ModelData(item_ids=out.item_ids, domains=domains, item_domains=dict(out.valid.catalogue),
                           tables=tables, extras={"train_domains": domains, "cache_dir": str(run_dir / "cache")})
    stats = {**out.stats, "prepare_seconds": round(time.time() - t0, 1), "source": source.name}
    return PreparedData("", model_data, out.valid, out.test, stats, {k: v.url for k, v in out.streams.items()},
                        {k: v.table for k, v in out.streams.items()})


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
