"""Driver-side data preparation for engine jobs: interactions -> leave-one-out -> streamed train shards.

The driver loads the interactions once (a synthetic world, the shipped MovieLens, or any canonical
Parquet dataset), splits them leave-one-out, writes the train sequences as Parquet row groups
(the unit the workers' streaming readers shard by) and keeps the valid/test `EvalSet`s for
evaluation. Workers then read only their shard of `<run_dir>/data/train`.

What every model may read (`ModelData`): the catalogue and eval domains, side tables by kind
(`items` with text, and `interactions`: every loaded interaction before `train_domains` filtering,
so a model can count a held-out domain's own popularity), and `extras["train_domains"]` (the
domains trained on) and `extras["cache_dir"]` (a run-local cache folder, e.g. for text vectors).
Train sequences carry `items`, `timestamps` and `domains` (each item's domain) per user; eval
rows carry the target's `timestamp`, the `history_domains` of their cross-domain history, and the
flags `new_user`, `new_item`, `unseen` against the source domains (`data.source_domains`, by
default the train domains), for `eval.groups`.
"""

from __future__ import annotations

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
from xdtrain.data.sequences import build_sequences, first_samples
from xdtrain.data.splits import leave_one_out
from xdtrain.eval.candidates import EvalSet
from xdtrain.models import ModelData
from xdtrain.models.prerec_data import unseen_flags
from xdtrain.outputs import AtomicFile
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
        tables = {k: f"{world}/{k}" for k in ("interactions", "items", "users", "entities", "triplets", "links")}
        return inter, f"synthetic world {world}", tables
    if cfg.source == "movielens":
        from xdtrain.data.movielens import MovieLensConfig, prepare

        ml = prepare(MovieLensConfig(dataset=cfg.dataset, domain_rule=cfg.domains, min_rating=cfg.min_rating,
                                     k_core=cfg.k_core, sequences="none"))
        items = write_table(ml.items.select(["item_id", "domain", "text"]), str(run_dir / "data" / "items"))
        return ml.interactions.select(columns), cfg.dataset, {"items": items}
    if cfg.source == "parquet":
        if not cfg.interactions_url:
            raise DataError("data.interactions_url: required when data.source is 'parquet'")
        inter = _read_parquet(cfg.interactions_url, columns)
        return inter, cfg.interactions_url, {"interactions": cfg.interactions_url}
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


def write_table(table: pa.Table, url: str, rows_per_group: int = 1 << 20) -> str:
    """Write `table` as one Parquet file of `rows_per_group`-row groups under folder `url`, atomically."""
    path = Path(url)
    with AtomicFile(path / "part-00000.parquet") as f:
        pq.write_table(table, f, row_group_size=max(1, rows_per_group))
    return str(path)


def write_sequences(seqs: pa.Table, url: str, rows_per_group: int) -> str:
    """Write the train sequences as one Parquet file of `rows_per_group`-row groups, atomically."""
    return write_table(seqs, url, rows_per_group)


def with_domains(inter: pa.Table, loo) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The leave-one-out train sequences with a `domains` list column, and the valid / test rows with
    the target's `timestamp` and the `history_domains` of their history (the same split, recomputed
    here with the domain carried along)."""
    parts = leave_one_out(inter)
    seqs = build_sequences(parts["train"], extra_columns=["domain"], by_domain=False)
    if not (seqs["user_id"].equals(loo.sequences["user_id"]) and seqs["items"].equals(loo.sequences["items"])):
        raise DataError("train sequences: the split with domains differs from the leave-one-out split")
    hist_dom = seqs["domains"].to_pylist()
    out = []
    for part, rows in (("valid", loo.valid.rows), ("test", loo.test.rows)):
        p = parts[part].sort_by("user_id")
        if not p["item_id"].equals(rows["item_id"]):
            raise DataError(f"{part} rows: the split with domains differs from the leave-one-out split")
        rows = rows.append_column("timestamp", pc.cast(p["timestamp"], pa.int64()))
        out.append(rows.append_column("history_domains", pa.array(hist_dom, pa.list_(pa.string()))))
        hist_dom = [h + [d] for h, d in zip(hist_dom, p["domain"].to_pylist())]  # test sees the valid item
    return seqs, out[0], out[1]


def with_seen_flags(rows: pa.Table, source_users: np.ndarray, source_items: np.ndarray) -> pa.Table:
    """Eval rows plus boolean columns `new_user` (the user has no source-domain interaction),
    `new_item` (the target is in no source-domain catalogue; raw ids) and `unseen` (both: the
    paper's unseen test set), so that `eval.groups=[unseen]` reports the paper's all / unseen."""
    none = np.zeros(0, np.int64)  # unseen_flags against an empty side tests the other side only
    flags = {"new_user": unseen_flags(rows, source_users, none),
             "new_item": unseen_flags(rows, none, source_items),
             "unseen": unseen_flags(rows, source_users, source_items)}
    for col, values in flags.items():
        rows = rows.append_column(col, pa.array(values, pa.bool_()))
    return rows


def prepare_data(cfg: DataConfig, run_dir: str | Path, min_groups: int = 1) -> PreparedData:
    """Load, filter domains, split leave-one-out, write train shards; see the module docstring."""
    run_dir = Path(run_dir)
    t0 = time.time()
    inter, name, tables = load_interactions(cfg, run_dir)
    if "interactions" not in tables:
        tables["interactions"] = write_table(inter, str(run_dir / "data" / "interactions"))
    # Users and items of the source domains, before train_domains filtering: a held-out domain's
    # users/items are "seen" when they occur in any source domain (paper sec. 4.1, code get_many).
    source = _keep_domains(inter, cfg.source_domains or cfg.train_domains,
                           "source_domains" if cfg.source_domains else "train_domains")
    source_users, source_items = (pc.unique(source[c]).to_numpy() for c in ("user_id", "item_id"))
    del source
    inter = _keep_domains(inter, cfg.train_domains, "train_domains")
    if inter.num_rows == 0:
        raise DataError(f"{name}: no interactions left after filtering")
    loo = leave_one_out_data(inter, name, per_domain_catalogue=cfg.per_domain_catalogue)
    seqs, valid_rows, test_rows = with_domains(inter, loo)
    valid_rows, test_rows = (with_seen_flags(r, source_users, source_items) for r in (valid_rows, test_rows))
    seqs = seqs.filter(pc.greater_equal(pc.list_value_length(seqs["items"]), 2))
    # Incremental fine-tuning: the first N samples of the users in a fixed shuffled order (the authors'
    # user-shuffled train split, seed 2023), so a smaller N is a subset of a larger one.
    seqs = first_samples(seqs, cfg.max_train_samples, seed=2023, where="data.max_train_samples")
    group = min(cfg.rows_per_group, max(1, seqs.num_rows // max(1, min_groups)))
    train_url = write_sequences(seqs, str(run_dir / "data" / "train"), group)
    valid, test = (EvalSet(r, s.catalogue, s.item_counts, name=s.name, history_column=s.history_column)
                   for r, s in ((valid_rows, loo.valid), (test_rows, loo.test)))
    if cfg.eval_domains:
        valid, test = (_eval_subset(s, cfg.eval_domains) for s in (valid, test))
    domains = sorted(valid.catalogue)
    model_data = ModelData(
        item_ids=loo.item_ids, domains=domains,
        item_domains={d: valid.catalogue[d] for d in domains}, tables=tables,
        extras={"train_domains": sorted(pc.unique(inter["domain"]).to_pylist()),
                "cache_dir": str(run_dir / "cache")},
    )
    stats = {**loo.stats, "train_sequences": seqs.num_rows,
             "train_samples": int(pc.sum(pc.list_value_length(seqs["items"])).as_py() or 0) - seqs.num_rows,
             "row_group_rows": group,
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
