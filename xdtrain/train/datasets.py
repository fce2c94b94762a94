"""Driver-side data preparation for engine jobs: interactions -> leave-one-out -> streamed train shards.

The driver loads the interactions once (a synthetic world, the shipped MovieLens, or any canonical
Parquet dataset), splits them leave-one-out, writes the train sequences as Parquet row groups
(the unit the workers' streaming readers shard by) and keeps the valid/test `EvalSet`s for
evaluation. Workers then read only their shard of `<run_dir>/data/train`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from xdtrain.config import load_config
from xdtrain.data.schemas import DataError, check_schema
from xdtrain.eval.candidates import EvalSet
from xdtrain.models import ModelData
from xdtrain.train.config import DataConfig
from xdtrain.train.reference import leave_one_out_data


@dataclass
class PreparedData:
    train_url: str  # Parquet dataset of the `sequences` table (raw item ids)
    model_data: ModelData
    valid: EvalSet
    test: EvalSet
    stats: dict


def load_interactions(cfg: DataConfig, run_dir: Path) -> tuple[pa.Table, str, dict[str, str]]:
    """(interactions, name, side tables by kind) for the configured source."""
    columns = ["user_id", "item_id", "domain", "timestamp"]
    if cfg.source == "synthetic":
        world = cfg.world_url
        if not world:
            from xdtrain.data.synthetic import WorldConfig, generate_world

            world = str(run_dir / "world")
            if not (Path(world) / "world.json").exists():
                wcfg = load_config(WorldConfig, cfg.world_config, ["output.overwrite=true", f"out={world}"])
                generate_world(wcfg, world, progress=True)
        inter = _read_parquet(f"{world}/interactions", columns)
        tables = {k: f"{world}/{k}" for k in ("items", "users", "entities", "triplets", "links")}
        return inter, f"synthetic world {world}", tables
    if cfg.source == "movielens":
        from xdtrain.data.movielens import MovieLensConfig, prepare

        ml = prepare(MovieLensConfig(dataset=cfg.dataset, domain_rule=cfg.domains, min_rating=cfg.min_rating,
                                     k_core=cfg.k_core, sequences="none"))
        return ml.interactions.select(columns), cfg.dataset, {}
    if cfg.source == "parquet":
        if not cfg.interactions_url:
            raise DataError("data.interactions_url: required when data.source is 'parquet'")
        return _read_parquet(cfg.interactions_url, columns), cfg.interactions_url, {}
    raise DataError(f"data.source: unknown source {cfg.source!r}; expected synthetic, movielens or parquet")


def _read_parquet(url: str, columns: list[str]) -> pa.Table:
    try:
        ds = pads.dataset(url, format="parquet")
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{url}: cannot open interactions dataset ({e})") from None
    check_schema(ds.schema, "interactions", url)
    return ds.to_table(columns=columns)


def _keep_domains(inter: pa.Table, domains: list[str], key: str) -> pa.Table:
    if not domains:
        return inter
    present = set(pc.unique(inter["domain"]).to_pylist())
    unknown = sorted(set(domains) - present)
    if unknown:
        raise DataError(f"data.{key}: unknown domain(s) {unknown}; the data has {sorted(present)}")
    return inter.filter(pc.is_in(inter["domain"], pa.array(domains, inter["domain"].type)))


def write_sequences(seqs: pa.Table, url: str, rows_per_group: int) -> str:
    """Write the train sequences as one Parquet file of `rows_per_group`-row groups, atomically."""
    path = Path(url)
    path.mkdir(parents=True, exist_ok=True)
    final = path / "part-00000.parquet"
    tmp = path / f".part-00000.parquet.tmp-{os.getpid()}"
    pq.write_table(seqs, tmp, row_group_size=max(1, rows_per_group))
    os.replace(tmp, final)
    return str(path)


def prepare_data(cfg: DataConfig, run_dir: str | Path, min_groups: int = 1) -> PreparedData:
    """Load, filter domains, split leave-one-out, write train shards; see the module docstring."""
    run_dir = Path(run_dir)
    t0 = time.time()
    inter, name, tables = load_interactions(cfg, run_dir)
    inter = _keep_domains(inter, cfg.train_domains, "train_domains")
    if inter.num_rows == 0:
        raise DataError(f"{name}: no interactions left after filtering")
    loo = leave_one_out_data(inter, name, per_domain_catalogue=cfg.per_domain_catalogue)
    seqs = loo.sequences.filter(pc.greater_equal(pc.list_value_length(loo.sequences["items"]), 2))
    group = min(cfg.rows_per_group, max(1, seqs.num_rows // max(1, min_groups)))
    train_url = write_sequences(seqs, str(run_dir / "data" / "train"), group)
    valid, test = loo.valid, loo.test
    if cfg.eval_domains:
        valid, test = (_eval_subset(s, cfg.eval_domains) for s in (valid, test))
    domains = sorted(valid.catalogue)
    model_data = ModelData(
        item_ids=loo.item_ids, domains=domains,
        item_domains={d: valid.catalogue[d] for d in domains}, tables=tables,
    )
    stats = {**loo.stats, "train_sequences": seqs.num_rows, "row_group_rows": group,
             "prepare_seconds": round(time.time() - t0, 1), "source": name}
    return PreparedData(train_url, model_data, valid, test, stats)


def _eval_subset(data: EvalSet, domains: list[str]) -> EvalSet:
    rows = data.rows.filter(pc.is_in(data.rows["domain"], pa.array(domains, pa.string())))
    if rows.num_rows == 0:
        raise DataError(f"data.eval_domains: no eval rows in {domains} ({data.name})")
    keep = {d: data.catalogue[d] for d in domains if d in data.catalogue}
    counts = {d: data.item_counts[d] for d in keep} if data.item_counts else None
    return EvalSet(rows, keep, counts, name=data.name, history_column=data.history_column)


def train_rows_per_rank(url: str, world_size: int) -> list[int]:
    """Rows each rank's streaming reader will see per epoch (from footers only)."""
    from xdtrain.data.reader import list_units, shard_units

    units = list_units(url, "sequences")
    return [sum(u.num_rows for u in shard_units(units, world_size, r)) for r in range(world_size)]


def catalogue_size(data: PreparedData) -> int:
    return int(np.asarray(data.model_data.item_ids).size)
