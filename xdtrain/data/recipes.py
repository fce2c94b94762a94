"""Data recipes: interactions -> named training streams (Parquet datasets) + valid / test eval sets.

A recipe is a split (which interactions are trained on, which are eval targets) plus the training
streams written from it. Every recipe returns the same `RecipeOutput`, whatever ran it:

    recipe = get_recipe(cfg.name)                                 # a `Recipe`
    out = recipe.prepare(InteractionsSource(name, table), cfg, out_dir)
    out.streams["train"]   # StreamData(url, table="sequences", rows, rows_per_group)
    out.valid, out.test    # EvalSets (eval rows + per-domain catalogues + train item counts)

Splits (`RecipeConfig.name`):
  leave_one_out         per user, the last interaction (time order) is test, the second-to-last
                        valid, the rest train; users with fewer than 3 stay whole in train
  leave_one_out_domain  the same per (user, domain): each domain of a user holds out its own last two
  chronological         global cut times t1 <= t2 (`times`, else chosen so that `ratios` of the
                        interactions fall in each part): train < t1 <= valid < t2 <= test; every
                        valid / test interaction is an eval target
  user                  whole users to train / valid / test by a seeded hash of the user id (`ratios`,
                        `seed`); a held-out user's last interaction is its target, the rest its history
  amid                  two-domain (user, target domain) rows, K_u subsampling, streams O and D
                        (xdtrain/data/amid_rows.py, `AmidRecipe`; configured by `RecipeConfig.amid`)

Streams (`RecipeConfig.streams`; written to `<out_dir>/<name>`, read with reader table kind `table`):
  train     kind "sequences": one row per user with >= 2 train items: user_id, items, timestamps,
            domains (each item's domain), oldest first; `max_train_samples` keeps the first N
            next-item samples in a seeded user order (incremental fine-tuning)
  train_by_domain  kind "sequences": the same train items, one row per (user, domain) with >= 2 of
            them: user_id, domain, items, timestamps; single-domain rows for a per-domain sampler
            (`xdtrain.data.sampler`); `max_train_samples` as for train
  labelled  kind "labelled": the train interactions as flat rows (user_id, item_id, domain, timestamp,
            label, observed) in sequence order; `label` is the source's (1 when it has none),
            `observed` the source's, else from the `users` side table (users it marks unobserved),
            else true
  items     kind "items": one row per (item, domain) of the catalogue: item_id, domain, text (from
            the `items` side table; null without one), for text / ID matchers
  by_domain kind "sequences", one dataset per domain D named `domain.<D>`: one row per user with train
            items in D (user_id, domain, items, timestamps), for paired per-domain streams
  overlap   kind "sequences": the `train` rows of the users with train items in two domains or more
            (each item's domain in `domains`), for cross-domain ties between a user's sequences

Eval rows: see `xdtrain.data.evalrows` (history = the user's interactions before the target, in every
domain, at most `max_history`); targets with no history are left out and counted in the stats. The
catalogue of a domain is every item of the interactions in it (`per_domain_catalogue`, else every
item); item counts are train counts.

Other implementations (a distributed one, issue 18) implement `Recipe.prepare` with the same inputs
and output: the source names its interactions by `url` (a Parquet dataset) as well as `table`, the
streams are Parquet datasets at any URL the workers can read, and the eval sets are small enough to
hold in memory. The in-memory implementation here (`LocalRecipe`) also gives the single-process
reference trainer its split (`split_interactions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.data.evalrows import target_rows
from xdtrain.data.schemas import DataError, check_batch
from xdtrain.data.sequences import build_sequences, first_samples, write_dataset
from xdtrain.data.splits import (
    assign_users,
    chronological_labels,
    leave_one_out_labels,
    time_cut_labels,
    time_order,
)
from xdtrain.data.validate import read_dataset
from xdtrain.eval.candidates import EvalSet, count_items

TRAIN, VALID, TEST, CONTEXT = 0, 1, 2, 3  # part of a row; CONTEXT: history of a held-out user only
RECIPES = ("leave_one_out", "leave_one_out_domain", "chronological", "user", "amid")
STREAMS = {"train": "sequences", "train_by_domain": "sequences", "labelled": "labelled", "items": "items",
           "by_domain": "sequences", "overlap": "sequences"}  # stream -> reader table kind
DOMAIN_STREAM = "domain.{}"  # the dataset name of domain D's sequences (stream `by_domain`)
SAMPLE_SEED = 2023  # the user order of `max_train_samples` (the PreRec authors' user-shuffled split)


@dataclass
class RecipeConfig:
    name: str = "leave_one_out"
    streams: list[str] = field(default_factory=lambda: ["train"])
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # chronological (no times), user
    times: list[float] = field(default_factory=list)  # chronological: cut times [t1, t2], timestamp units
    seed: int = 0  # user: seed of the user hash
    per_domain_catalogue: bool = True  # rank a target only against items of its own domain
    max_history: int = 0  # eval rows keep the last N history items (0 = all)
    rows_per_group: int = 256  # sequence rows per Parquet row group (the reader's shard unit)
    flat_rows_per_group: int = 65536  # rows per row group of the flat streams (labelled, items)
    max_train_samples: int = 0  # train stream: first N next-item samples (0 = all)
    min_groups: int = 1  # at least this many row groups per stream when there are rows enough (workers)
    amid: Any = None  # recipe `amid`: its AmidDataConfig (xdtrain/data/amid_rows.py; streams O and D, fixed)
    # chronological: inclusive upper timestamps of train and valid (None: below every row), exact in
    # the timestamp's own type; what the distributed path finds for `ratios` (not a config key)
    cut_values: list = field(default_factory=list)

    def check(self) -> None:
        """Raise DataError naming the bad key (as `data.<key>` of the engine config)."""
        if self.name not in RECIPES:
            raise DataError(f"data.recipe: unknown recipe {self.name!r}; expected one of {list(RECIPES)}")
        if self.name == "amid":
            if self.amid is None:
                raise DataError("data.recipe 'amid': no AMID rows config (data.pair / data.train_domains, data.k_u)")
            return
        unknown = sorted(set(self.streams) - set(STREAMS))
        if unknown or not self.streams:
            raise DataError(f"data.streams: unknown stream(s) {unknown or '(none given)'}; "
                            f"expected some of {list(STREAMS)}")
        if self.times and (len(self.times) != 2 or self.times[0] > self.times[1]):
            raise DataError(f"data.split_times: expected two cut times t1 <= t2, got {self.times}")
        r = np.asarray(self.ratios, dtype=np.float64)
        if r.shape != (3,) or (r < 0).any() or not np.isclose(r.sum(), 1.0):
            raise DataError(f"data.split_ratios: expected three non-negative numbers summing to 1, got {self.ratios}")


@dataclass
class InteractionsSource:
    """The interactions to split (canonical columns, plus `label` / `observed` when present) and the
    side tables by kind (`items` with text, `users` with `observed`)."""

    name: str  # names the data in messages and eval-set names
    table: pa.Table | None = None  # in memory (what `LocalRecipe` reads) ...
    url: str = ""  # ... or a Parquet dataset
    tables: dict[str, str] = field(default_factory=dict)

    def load(self) -> pa.Table:
        if self.table is not None:
            return self.table
        if not self.url:
            raise DataError(f"{self.name}: the interactions source has neither a table nor a URL")
        return read_dataset(self.url, "interactions")[1]


@dataclass
class StreamData:
    url: str  # Parquet dataset
    table: str  # reader table kind (`xdtrain.data.schemas.TABLES`)
    rows: int
    rows_per_group: int


@dataclass
class RecipeOutput:
    streams: dict[str, StreamData]
    valid: EvalSet
    test: EvalSet
    item_ids: np.ndarray  # the catalogue: sorted unique raw item ids of every domain
    stats: dict


class Recipe(Protocol):
    def prepare(self, source: InteractionsSource, cfg: RecipeConfig, out_dir: str | Path) -> RecipeOutput:
        """Split `source` as `cfg` says, write `cfg.streams` under `out_dir`, return what was made."""
        ...


def get_recipe(name: str) -> Recipe:
    """The implementation that prepares recipe `name` (every recipe runs in memory for now)."""
    if name == "amid":
        from xdtrain.data.amid_rows import AmidRecipe

        return AmidRecipe()
    RecipeConfig(name=name).check()
    return LocalRecipe()


# ---------------------------------------------------------------- the split, in memory


@dataclass
class Split:
    """Every interaction in sequence order (user, then time), each with its part."""

    rows: pa.Table
    start: np.ndarray  # first row of each row's user
    part: np.ndarray  # TRAIN, VALID, TEST or CONTEXT
    item_ids: np.ndarray
    catalogue: dict[str, np.ndarray]
    name: str
    stats: dict

    def train(self) -> pa.Table:
        return self.rows.filter(pa.array(self.part == TRAIN))

    def train_sequences(self, with_domains: bool = True, by_domain: bool = False) -> pa.Table:
        """One row per user with train interactions: user_id, items, timestamps (, domains: each item's);
        `by_domain`: one row per (user, domain) instead, with a `domain` column."""
        if by_domain:
            return build_sequences(self.train(), extra_columns=[], by_domain=True)
        return build_sequences(self.train(), extra_columns=["domain"] if with_domains else [], by_domain=False)

    def eval_rows(self, max_history: int = 0) -> dict[str, pa.Table]:
        """{"valid", "test"}: the eval rows of targets with a history; their row counts go to `stats`."""
        out = {}
        for part, label in (("valid", VALID), ("test", TEST)):
            targets = np.flatnonzero(self.part == label)
            has_history = self.start[targets] < targets
            self.stats[f"{part}_rows"] = int(has_history.sum())
            if not has_history.all():
                self.stats[f"{part}_rows_without_history"] = int((~has_history).sum())
            out[part] = target_rows(self.rows, self.start, targets[has_history], max_history)
        return out

    def eval_sets(self, max_history: int = 0, recipe: str = "") -> tuple[EvalSet, EvalSet]:
        """Valid and test eval sets; their row counts go to `stats`."""
        counts = count_items(self.train(), self.catalogue)  # popularity:N candidates, the POP baseline
        rows = self.eval_rows(max_history)
        for part in rows:
            check_eval_rows(self.stats, part, self.name, recipe)
        return tuple(EvalSet(rows[p], self.catalogue, counts, name=f"{self.name} {p}") for p in ("valid", "test"))


def check_eval_rows(stats: dict, part: str, name: str, recipe: str) -> None:
    """Raise DataError when the split left no `part` rows with a history (`stats` as `eval_rows` counts)."""
    if stats.get(f"{part}_rows", 0):
        return
    hint = ("check data.split_ratios / data.split_times" if recipe in ("chronological", "user")
            else "leave-one-out evaluates users with 3 interactions or more")
    raise DataError(f"{name}: recipe {recipe!r} leaves no {part} rows with a history "
                    f"({stats.get(f'{part}_rows_without_history', 0)} target(s)); {hint}")


def split_interactions(interactions: pa.Table, cfg: RecipeConfig, name: str) -> Split:
    """The split `cfg.name` of `interactions`, in memory."""
    cfg.check()
    check_batch(interactions, "interactions", name)
    stats: dict = {}
    if cfg.name in ("leave_one_out", "leave_one_out_domain"):
        rows, part = leave_one_out_labels(interactions, by_domain=cfg.name == "leave_one_out_domain")
    elif cfg.name == "chronological" and cfg.cut_values:
        rows, ts = interactions, interactions["timestamp"].to_numpy()
        part = np.zeros(len(ts), np.int64)
        for bound in cfg.cut_values:
            part += ts > bound if bound is not None else 1
    elif cfg.name == "chronological" and cfg.times:
        rows, part = interactions, time_cut_labels(interactions, cfg.times)
        stats["cut_times"] = list(cfg.times)
    elif cfg.name == "chronological":
        rows, part = chronological_labels(interactions, cfg.ratios, mode="global")
        ts = rows["timestamp"].to_numpy()
        stats["cut_times"] = [ts[part >= k].min().item() if (part >= k).any() else None for k in (VALID, TEST)]
    else:
        rows, part = interactions, assign_users(interactions["user_id"], cfg.ratios, cfg.seed).astype(np.int64)
    rows, start = time_order(rows.append_column("__part", pa.array(part, pa.int64())), ["user_id"])
    part = rows["__part"].to_numpy()
    rows = rows.drop_columns(["__part"])
    if cfg.name == "user":  # a held-out user's last interaction is its target, the rest its history
        last = np.append(start[1:] != start[:-1], True)
        part = np.where((part != TRAIN) & ~last, CONTEXT, part)
    item_ids = np.unique(interactions["item_id"].to_numpy())
    domains = pc.unique(interactions["domain"]).to_pylist()
    if cfg.per_domain_catalogue:
        dom = interactions["domain"]
        catalogue = {d: np.unique(interactions.filter(pc.equal(dom, d))["item_id"].to_numpy()) for d in domains}
    else:
        catalogue = {d: item_ids for d in domains}
    stats = {"users": len(pc.unique(rows["user_id"])), "items": len(item_ids), "interactions": rows.num_rows,
             "train_interactions": int((part == TRAIN).sum()), **stats}
    return Split(rows, start, part, item_ids, catalogue, name, stats)


# ---------------------------------------------------------------- streams


def group_rows(n: int, cap: int, min_groups: int) -> int:
    """Rows per row group: at most `cap`, and small enough for `min_groups` groups (one per worker)."""
    return min(cap, max(1, n // max(1, min_groups)))


def _sequences_stream(split: Split, cfg: RecipeConfig, by_domain: bool = False) -> tuple[pa.Table, int, dict]:
    seqs = split.train_sequences(by_domain=by_domain)
    seqs = seqs.filter(pc.greater_equal(pc.list_value_length(seqs["items"]), 2))
    seqs = first_samples(seqs, cfg.max_train_samples, seed=SAMPLE_SEED, where="data.max_train_samples")
    group = group_rows(seqs.num_rows, cfg.rows_per_group, cfg.min_groups)
    samples = int(pc.sum(pc.list_value_length(seqs["items"])).as_py() or 0) - seqs.num_rows
    if not by_domain:
        return seqs, group, {"train_sequences": seqs.num_rows, "train_samples": samples, "row_group_rows": group}
    per_domain = seqs.group_by("domain").aggregate([("domain", "count")]).sort_by("domain")
    return seqs, group, {"train_by_domain_rows": dict(zip(per_domain["domain"].to_pylist(),
                                                          per_domain["domain_count"].to_pylist())),
                         "train_by_domain_samples": samples}


def _domain_streams(split: Split) -> dict[str, pa.Table]:
    """`domain.<D>` -> the train sequences of domain D, one row per user."""
    seqs = build_sequences(split.train(), extra_columns=[], by_domain=True)
    dom = seqs["domain"]
    domains = sorted(pc.unique(dom).to_pylist())
    bad = [d for d in domains if not d or "/" in d or "\\" in d or d in (".", "..")]
    if bad:
        raise DataError(f"{split.name}: domain name(s) {bad} cannot name a dataset folder (stream by_domain)")
    return {DOMAIN_STREAM.format(d): seqs.filter(pc.equal(dom, d)) for d in domains}


def _overlap_stream(split: Split) -> pa.Table:
    """The train sequences (all domains) of the users with train items in two domains or more."""
    train = split.train()
    pairs = pa.table({"u": train["user_id"], "d": pc.cast(train["domain"], pa.string())})
    counts = pairs.group_by("u").aggregate([("d", "count_distinct")])
    users = counts.filter(pc.greater_equal(counts["d_count_distinct"], 2))["u"]
    seqs = split.train_sequences()
    return seqs.filter(pc.is_in(seqs["user_id"], users))


def _labelled_stream(split: Split, source: InteractionsSource) -> pa.Table:
    train = split.train()
    n = train.num_rows
    label = train["label"] if "label" in train.column_names else pa.array(np.ones(n, np.int8))
    if "observed" in train.column_names:
        observed = train["observed"]
    else:
        unobserved = _unobserved_users(source)
        observed = pa.array(~np.isin(train["user_id"].to_numpy(), unobserved))
    return pa.table({"user_id": train["user_id"], "item_id": train["item_id"],
                     "domain": pc.cast(train["domain"], pa.string()), "timestamp": train["timestamp"],
                     "label": label, "observed": pc.cast(observed, pa.bool_())})


def _unobserved_users(source: InteractionsSource) -> np.ndarray:
    """Users the `users` side table marks `observed = false` (none without such a table or column)."""
    url = source.tables.get("users")
    if not url:
        return np.zeros(0, np.int64)
    users = read_dataset(url, "users", ["user_id"], optional=["observed"])[1]
    if "observed" not in users.column_names:
        return np.zeros(0, np.int64)
    return users.filter(pc.invert(users["observed"]))["user_id"].to_numpy()


def items_table(pairs: pa.Table, source: InteractionsSource) -> pa.Table:
    """The `items` stream of the catalogue's (item_id, domain) pairs: text from the `items` side table
    (null without one), sorted by (domain, item_id)."""
    pairs = pa.table({"item_id": pc.cast(pairs["item_id"], pa.int64()),
                      "domain": pc.cast(pairs["domain"], pa.string())}).group_by(["item_id", "domain"]).aggregate([])
    url = source.tables.get("items")
    if url:
        text = read_dataset(url, "items", ["item_id", "domain"], optional=["text"])[1]
        if "text" in text.column_names:
            text = pa.table({"item_id": text["item_id"],
                             "domain": pc.cast(text["domain"], pa.string()),
                             "text": pc.cast(text["text"], pa.string())})
            pairs = pairs.join(text, ["item_id", "domain"], join_type="left outer")
    if "text" not in pairs.column_names:
        pairs = pairs.append_column("text", pa.nulls(pairs.num_rows, pa.string()))
    return pairs.sort_by([("domain", "ascending"), ("item_id", "ascending")]).combine_chunks()


def stream_tables(split: Split, source: InteractionsSource, cfg: RecipeConfig,
                  names: list[str]) -> tuple[dict[str, tuple[str, pa.Table, int]], dict]:
    """The tables of the training streams `names` built from `split`: {dataset key: (stream name,
    table, rows per row group)} and their stats. Both implementations write what this returns: the
    in-memory one for the whole log, the distributed one for each user partition."""
    stats: dict = {}
    out: dict[str, tuple[str, pa.Table, int]] = {}
    for name in names:
        if name in ("train", "train_by_domain"):
            table, group, more = _sequences_stream(split, cfg, by_domain=name == "train_by_domain")
            stats.update(more)
            out[name] = (name, table, group)
        elif name in ("by_domain", "overlap"):
            made = _domain_streams(split) if name == "by_domain" else {name: _overlap_stream(split)}
            for key, t in made.items():
                out[key] = (name, t, group_rows(t.num_rows, cfg.rows_per_group, cfg.min_groups))
                stats[f"{key}_rows"] = t.num_rows
        else:
            table = _labelled_stream(split, source) if name == "labelled" else items_table(split.rows, source)
            out[name] = (name, table, group_rows(table.num_rows, cfg.flat_rows_per_group, cfg.min_groups))
            stats[f"{name}_rows"] = table.num_rows
    return out, stats


class LocalRecipe:
    """Every recipe in one process, on Arrow tables in memory."""

    def prepare(self, source: InteractionsSource, cfg: RecipeConfig, out_dir: str | Path) -> RecipeOutput:
        split = split_interactions(source.load(), cfg, source.name)
        valid, test = split.eval_sets(cfg.max_history, cfg.name)
        tables, more = stream_tables(split, source, cfg, cfg.streams)
        stats = {**split.stats, **more}
        streams = {}
        for key, (name, table, group) in tables.items():
            # an empty overlap stream is allowed: 0% overlap is an experiment (RecGURU)
            if table.num_rows == 0 and name != "overlap":
                raise DataError(f"{source.name}: recipe {cfg.name!r} leaves stream {key!r} empty")
            if table.num_rows == 0:
                continue
            url = write_dataset(table, Path(out_dir) / key, group, only_file=True)
            streams[key] = StreamData(url, STREAMS[name], table.num_rows, group)
        stats["recipe"] = cfg.name
        return RecipeOutput(streams, valid, test, split.item_ids, stats)
