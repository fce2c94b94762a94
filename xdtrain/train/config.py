"""Configs of the engine jobs (pretrain, finetune, evaluate): one YAML per experiment, dotted overrides.

    run_dir: runs/demo
    verbose: false                                       # true: Ray's own output on the console, not logs/ray.log
    data:  {source: synthetic, world_config: configs/world_demo.yaml}
    model: {name: seqrec, backbone: sasrec, d: 48}      # the rest of `model` is the model's own config
    scale: {workers: 2}                                  # Ray Train workers (min_workers > 0: elastic)
    ps:    {backend: ray, shards: 2, prefetch: true}
    train: {epochs: 10, batch_size: 128, lr: 0.001}
    eval:  {candidates: [full], ks: [10]}
    transfer: {ps_optimizer: fresh, tables: {item: keep, tag: new}}   # with init_from (finetune)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from xdtrain.config import ConfigError

OPTIMIZER_STATE = ("fresh", "kept")
TABLE_MODES = ("keep", "new", "import")


@dataclass
class DataConfig:
    # released: AMID's CSVs (data.released_dir, data.pair); two_domain_csv: one two-domain CSV (RecGURU)
    source: Literal["synthetic", "movielens", "parquet", "released", "two_domain_csv"] = "synthetic"
    world_config: str = "configs/world_demo.yaml"  # synthetic: generated into <run_dir>/world ...
    world_url: str = ""  # ... unless an existing world (or any canonical interactions dataset) is given
    dataset: str = "ml-1m"  # movielens: ml-1m | ml-100k
    domains: str = "none"  # movielens: none | genre | zip_region | platform
    min_rating: float = 0.0
    k_core: int = -1  # keep users and items with >= k interactions, iterated (-1: MovieLens 5, else none)
    exclude_title_twins: str = ""  # movielens: drop items whose title this dataset has too (e.g. ml-100k)
    interactions_url: str = ""  # parquet: a canonical interactions dataset at any fsspec URL; two_domain_csv: the CSV
    two_domain_names: list[str] = field(default_factory=lambda: ["d1", "d2"])  # two_domain_csv: seq_d1's, seq_d2's
    # Overlap-rate variants (xdtrain.data.two_domain.resample_overlap): keep overlap_rate x |users of
    # overlap_reference| users in both domains, the others in one; < 0 = the data as it is.
    overlap_rate: float = -1.0
    overlap_reference: str = ""
    overlap_seed: int = 0
    # Rows equal in every column read: drop (all but the first, with a warning), keep, or error.
    duplicates: Literal["drop", "keep", "error"] = "drop"
    per_domain_catalogue: bool = True  # rank a target only against items of its own domain
    train_domains: list[str] = field(default_factory=list)  # train on these domains only (empty = all)
    eval_domains: list[str] = field(default_factory=list)  # evaluate on these (empty = all)
    # 'seen' means seen in these: eval rows get new_user / new_item / unseen flags against them
    source_domains: list[str] = field(default_factory=list)  # empty = train_domains (or all)
    rows_per_group: int = 256  # users per Parquet row group of the training sequences (the shard unit)
    max_train_samples: int = 0  # keep the first N next-item train samples (incremental fine-tuning; 0 = all)
    # The data recipe (xdtrain/data/recipes.py): the split, and the training streams written from it.
    recipe: str = "leave_one_out"  # leave_one_out | leave_one_out_domain | chronological | user
    streams: list[str] = field(default_factory=lambda: ["train"])  # of: train, train_by_domain, labelled, items
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # chronological (no times), user
    split_times: list[float] = field(default_factory=list)  # chronological: cut times [t1, t2]
    split_seed: int = 0  # user: seed of the user hash
    max_history: int = 0  # eval rows keep the last N history items (0 = all)
    flat_rows_per_group: int = 65536  # rows per Parquet row group of the labelled and items streams
    # Recipe `amid` (xdtrain/data/amid_rows.py): two-domain (user, target domain) rows, streams O and D.
    released_dir: str = ""  # source `released`: the folder of <pair>_train{K}.csv, _train{K}_DR.csv, _test.csv
    pair: str = ""  # "<domain 1>_<domain 2>", e.g. cloth_sport: the file prefix and the two domains, in order
    k_u: float = 0.25  # share of non-overlapping train rows observed (in O)
    mnar: float = 0.0  # logs path: O's non-overlapping rows drawn ∝ popularity(target)^mnar (0: uniform)
    valid_ratio: float = 0.1  # observed train rows carved out for model selection
    test_ratio: float = 0.2  # logs path: rows to test
    amid_min_seq: int = 5  # logs path: a row needs >= this many target items, the other domain >= this or none
    hide_other: float = 0.0  # logs path: share of both-domain users whose other domain is dropped
    # Where the recipe runs (xdtrain/data/distributed.py): memory (one process), ray (a Ray Data
    # pipeline over user partitions, driver memory bounded by the catalogue), or auto: ray for a
    # Parquet log of more than memory_max_rows interactions, when the recipe can run there.
    prepare: Literal["auto", "memory", "ray"] = "auto"
    memory_max_rows: int = 20_000_000
    partition_rows: int = 4_000_000  # ray: interactions per user partition
    eval_user_fraction: float = 1.0  # evaluate a seeded sample of the users (both paths; 1 = all)
    reuse_prepared: bool = True  # a re-run reuses <run_dir>/data when its inputs and config hash match


@dataclass
class ScaleConfig:
    workers: int = 2  # Ray Train workers (the maximum when elastic)
    min_workers: int = 0  # > 0: elastic between min_workers and workers
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trainer_resource: float = 0.0  # amount of the custom `trainer` resource per worker (0 = none)
    threads: int = 1  # torch intra-op threads per worker
    resize_check_s: float = 10.0  # elastic: how often Ray Train looks for more capacity
    address: str = ""  # Ray address; "" = RAY_ADDRESS or an embedded local Ray


@dataclass
class PSConfig:
    backend: Literal["ray", "local"] = "ray"  # local: in-process tables (1 worker only)
    shards: int = 2
    prefetch: bool = True  # pull the next batch's rows while this batch computes
    staleness: int = 0  # this client's pushes a prefetched row may miss (0 = none)
    # Synchronous pushes: each iteration's pushes land before any worker's next pull (no prefetch).
    # Without it a worker may pull a row before another worker's push of the previous step lands.
    sync: bool = False
    max_restarts: int = 3


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 128  # global: split evenly over the workers
    lr: float = 1e-3  # dense Adam
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.0
    seed: int = 0
    shuffle_buffer: int = 4096  # rows (users) shuffled together by the streaming reader
    checkpoint_every: int = 0  # steps between checkpoints (0 = at each epoch end only)
    eval_every: int = 1  # epochs between validations (0 = never validate during training)
    patience: int = 5  # validations without improvement before stopping (0 = never stop early)
    eval_at_start: bool = False  # validate and checkpoint the starting model too, so early stopping can keep it
    max_steps: int = 0  # stop after this many steps (0 = no limit)
    max_minutes: float = 0.0  # wall budget (0 = none); checked at each step
    max_failures: int = 3  # worker-group restarts Ray Train may make
    log_every: int = 10  # steps between progress records
    keep_checkpoints: int = 2
    trace_rows: bool = False  # record the user ids each rank reads per iteration (run_dir/trace; tests, audits)
    progress: bool = True


@dataclass
class EvalSection:
    candidates: list[str] = field(default_factory=lambda: ["full"])
    ks: list[int] = field(default_factory=lambda: [10])
    monitor: str = "ndcg@10"  # on the first candidate mode
    seed: int = 0
    tie_policy: Literal["pessimistic", "optimistic", "average"] = "average"  # pessimistic: ties rank above
    pop_exponent: float = 1.0  # popularity:N candidates are drawn with weight count^pop_exponent
    batch_size: int = 512
    k_percents: list[float] = field(default_factory=list)  # PreRec Recall@K% / r-NDCG@K%, e.g. [0.5]
    rndcg_a: float = 2.0  # r-NDCG = log(a) / log(a + b (rank - 1) / N)  (paper Eq. 11)
    rndcg_b: float = 15000.0
    groups: list[str] = field(default_factory=list)  # eval-row columns to break results down by, e.g. [unseen]
    keep_rows: bool = False  # test reports also write every row's metrics (<scorer>_<mode>/metrics_rows.parquet)
    baselines: list[str] = field(default_factory=lambda: ["pop"])  # also scored at test time: pop, random, sbert
    text_model: str = "minilm"  # sbert baseline: sentence-transformers model of the item texts
    text_cache: str = ""  # sbert baseline: text-vector cache ("" = the model's text_cache, or <run_dir>/cache/text)


@dataclass
class TransferConfig:
    """How a job started from `init_from` carries the checkpoint over (xdtrain/train/transfer.py).

    Dense weights: every entry the model and the checkpoint share is loaded, new modules (heads)
    keep their init. PS tables, by `tables`: keep (the checkpoint's rows), new (empty, fresh from
    the model's TableSpec) or import (new, then filled from the Parquet in `import_tables`); a table
    not listed is kept when the checkpoint has it, else new.

    Optimizer state is fresh by default, dense and PS: a transfer starts a new task or phase. New
    heads and tables have no moments to keep; the kept ones summarise gradients of the old data;
    and a kept Adam is past its bias correction, so its first steps on the new task run at full
    size, scaled by the old task's statistics, under a new lr. `kept` carries it on (a paused run
    continued under a new config, say).
    """

    dense_optimizer: Literal["fresh", "kept"] = "fresh"
    ps_optimizer: Literal["fresh", "kept"] = "fresh"
    tables: dict[str, Literal["keep", "new", "import"]] = field(default_factory=dict)
    import_tables: dict[str, str] = field(default_factory=dict)  # table -> Parquet URL (id, vector)

    def __post_init__(self) -> None:
        for key in ("dense_optimizer", "ps_optimizer"):
            if getattr(self, key) not in OPTIMIZER_STATE:
                raise ConfigError(f"transfer.{key} must be one of {list(OPTIMIZER_STATE)}, got {getattr(self, key)!r}")
        for name, mode in self.tables.items():
            if mode not in TABLE_MODES:
                raise ConfigError(f"transfer.tables.{name} must be one of {list(TABLE_MODES)}, got {mode!r}")
            if mode == "import" and not self.import_tables.get(name):
                raise ConfigError(f"transfer.tables.{name} is 'import': "
                                  f"set transfer.import_tables.{name}=<Parquet URL>")
        for name, url in self.import_tables.items():
            if self.tables.get(name, "import") != "import":
                raise ConfigError(f"transfer.import_tables.{name} is set, but transfer.tables.{name} is "
                                  f"{self.tables[name]!r} (use 'import')")
            if not url:
                raise ConfigError(f"transfer.import_tables.{name}: empty URL")

    def mode(self, table: str) -> str | None:
        """keep / new / import as configured for `table` (None: not configured)."""
        return "import" if table in self.import_tables else self.tables.get(table)


@dataclass
class EngineConfig:
    run_dir: str = "runs/pretrain"
    overwrite: bool = False  # write into an existing non-empty run_dir that xdtrain did not create
    resume_from: str = ""  # a checkpoint dir; "" = resume automatically if run_dir holds an unfinished run
    init_from: str = ""  # finetune: start dense + PS from this checkpoint (see `transfer`), fresh data cursor
    export_embeddings: bool = True  # write the model's vectors (export hook, else PS tables) under run_dir/embeddings
    verbose: bool = False  # show Ray's own output on the console (else it goes to run_dir/logs/ray.log)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"name": "seqrec"})
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    transfer: TransferConfig = field(default_factory=TransferConfig)



# Allowed values as intervals: '[' / ']' include the bound, '(' / ')' exclude it; no bound = unbounded.
RANGES: dict[str, str] = {
    "data.k_core": "[-1,)", "data.memory_max_rows": "[0,)", "data.partition_rows": "[1,)",
    "data.eval_user_fraction": "(0,1]", "data.rows_per_group": "[1,)", "data.flat_rows_per_group": "[1,)",
    "data.max_train_samples": "[0,)", "data.max_history": "[0,)",
    "scale.workers": "[1,)", "scale.min_workers": "[0,)", "scale.cpus_per_worker": "(0,)",
    "scale.trainer_resource": "[0,)", "scale.threads": "[0,)", "scale.resize_check_s": "(0,)",
    "ps.shards": "[1,)", "ps.staleness": "[0,)", "ps.max_restarts": "[-1,)",
    "train.epochs": "[0,)", "train.batch_size": "[1,)", "train.lr": "[0,)", "train.beta1": "[0,1)",
    "train.beta2": "[0,1)", "train.weight_decay": "[0,)", "train.shuffle_buffer": "[0,)",
    "train.checkpoint_every": "[0,)", "train.eval_every": "[0,)", "train.patience": "[0,)",
    "train.max_steps": "[0,)", "train.max_minutes": "[0,)", "train.max_failures": "[-1,)",
    "train.log_every": "[1,)", "train.keep_checkpoints": "[1,)",
    "eval.batch_size": "[1,)", "eval.ks": "[1,)", "eval.k_percents": "(0,100]",
}


def in_range(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval` (RANGES notation); NaN never does."""
    lo, hi = interval[1:-1].split(",")
    return not math.isnan(value) and \
        (not lo or (value >= float(lo) if interval[0] == "[" else value > float(lo))) and \
        (not hi or (value <= float(hi) if interval[-1] == "]" else value < float(hi)))


def check_ranges(cfg: EngineConfig) -> None:
    """Raise ConfigError naming the first key whose value (or an item of a list value) is outside RANGES."""
    from xdtrain.config import ConfigError

    for key, interval in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not all(in_range(v, interval) for v in (value if isinstance(value, list) else [value])):
            lo, hi = interval[1:-1].split(",")
            want = f"in {interval}" if lo and hi else (f"{'>=' if interval[0] == '[' else '>'} {lo}")
            raise ConfigError(f"{key} must be {want}, got {value}")


@dataclass
class RefreshChecks:
    """What a refreshed version must pass before it is published (xdtrain/refresh/checks.py)."""

    max_shrink: float = 0.01  # a table may have at most this share fewer rows than the previous version's
    max_norm: float = 1e4  # no vector longer than this
    max_norm_ratio: float = 2.0  # mean vector norm within [1/r, r] times the previous version's
    drift_sample: int = 1000  # fixed sample of keys (smallest id hashes) compared with the previous version
    min_drift_cosine: float = 0.5  # their mean cosine to the previous version's vectors (-1: never fails)
    canary_rows: int = 500  # held-out test rows ranked from the published vectors and by the model (0: off)
    canary_metric: str = "ndcg@10"  # full-catalogue metric compared
    canary_tolerance: float = 0.01  # largest |published - model| allowed


@dataclass
class RefreshConfig(EngineConfig):
    """`python -m jobs.refresh_embeddings --config <pretrain yaml> checkpoint=<dir> out=<url>`: the
    pre-training config (its data and model sections) plus what to refresh, from and to where."""

    checkpoint: str = ""  # an engine checkpoint directory (e.g. runs/demo/train/checkpoint_*)
    out: str = ""  # the embedding store (fsspec URL): versions v=<version>/ and the CURRENT pointer
    version: str = ""  # "" = step<N>-<digest of the checkpoint manifest>: a re-run resumes the same version
    keep: int = 3  # published versions kept besides the current one (rollback targets)
    users: str = ""  # user histories (Parquet: user_id, history[, domain, ...]); "" = the test split's rows
    refresh_dir: str = ""  # this job's work folder and metrics.json; "" = <run_dir>/refresh
    workers: int = 2  # Ray Data inference actors
    batch_size: int = 8192  # rows per inference batch
    rows_per_bucket: int = 262144  # rows per Parquet bucket file of a published table
    checks: RefreshChecks = field(default_factory=RefreshChecks)
