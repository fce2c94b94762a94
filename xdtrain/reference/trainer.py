"""Reference single-process trainer: one backbone, a local item table, no Ray, no parameter server.

It is the correctness baseline the distributed engine must match (same batches, same losses) and
the speed baseline (samples/s) its benchmark compares against. The engine reuses the pieces:
`xdtrain.nn.batches` (padded batches, Cloze masking, negatives) and `xdtrain.nn.losses.sequence_loss`.

    model = Recommender(make_backbone(cfg.model), num_items, cfg.model.d, max_len=cfg.model.max_len)
    result = fit_reference(model, train_seqs, validate, cfg.train, cfg.model, run_dir, monitor)  # early stopping

`validate(model) -> {metric: value}` is any callable; `Evaluation` wraps the project evaluator.

`run_reference` is the job (`python -m jobs.train_reference --config configs/ml1m_sasrec.yaml`): it loads
a dataset, splits it leave-one-out (the engine's default data recipe, `xdtrain.data.recipes`), trains,
restores the best checkpoint and reports test metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from tqdm import tqdm

from xdtrain.data.movielens import MovieLensConfig, prepare
from xdtrain.data.recipes import RecipeConfig, split_interactions
from xdtrain.eval.candidates import EvalSet, prepare_candidates
from xdtrain.eval.evaluator import EmbeddingScorer, EvalConfig, evaluate
from xdtrain.nn import BERT4Rec, make_backbone
from xdtrain.nn.batches import add_negatives, batch_order, cloze_batch, next_item_batch, pad_right
from xdtrain.nn.losses import sequence_loss
from xdtrain.outputs import claim_output_dir, write_bytes_atomic

# ---------------------------------------------------------------- configs


@dataclass
class ModelConfig:
    backbone: Literal["sasrec", "gru4rec", "bert4rec"] = "sasrec"
    d: int = 50
    max_len: int = 200
    layers: int = 2  # SASRec blocks / BERT4Rec layers / GRU layers
    heads: int = 1
    dropout: float = 0.2
    init_std: float = 0.02  # item table init (normal); row 0 (padding) is zero
    mask_prob: float = 0.2  # BERT4Rec Cloze masking
    last_only_prob: float = 0.1  # BERT4Rec: share of rows that hide only their last item


@dataclass
class TrainConfig:
    loss: Literal["bpr", "bce", "sampled_softmax", "full_softmax"] = "bce"
    negatives: int = 1  # per position (bpr/bce) or shared per batch (sampled_softmax)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without improvement before stopping
    max_minutes: float = 0.0  # wall budget of the fit, validations included (0 = none); checked per batch
    bucket: int = 50  # group rows of similar length within chunks of this many batches (1 = off)
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch default)
    progress: bool = True  # tqdm bar


@dataclass
class ReferenceDataConfig:
    dataset: str = "ml-1m"
    min_rating: float = 0.0  # ratings >= this are positives (0 = every rating, the SASRec/BERT4Rec protocol)
    k_core: int = 5


@dataclass
class ReferenceEvalConfig:
    candidates: list[str] = field(default_factory=lambda: ["uniform:100", "full"])
    ks: list[int] = field(default_factory=lambda: [10])
    monitor: str = "ndcg@10"  # early-stopping metric (evaluator name), on the first candidate mode
    seed: int = 0
    batch_size: int = 512


@dataclass
class ReferenceConfig:
    run_dir: str = "runs/reference"
    overwrite: bool = False  # write into an existing non-empty run_dir that xdtrain did not create
    init_checkpoint: str = ""  # safetensors to start from; with train.epochs=0 the job only evaluates it
    data: ReferenceDataConfig = field(default_factory=ReferenceDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: ReferenceEvalConfig = field(default_factory=ReferenceEvalConfig)


# ---------------------------------------------------------------- model


class Recommender(nn.Module):
    """A backbone plus a local item table (ids 1..num_items, 0 = padding): the single-process model.
    `max_len` is the history window used for inference (training windows come from the batch builder)."""

    def __init__(self, backbone: nn.Module, num_items: int, d: int, init_std: float = 0.02,
                 max_len: int = 200):
        super().__init__()
        self.backbone = backbone
        self.num_items = num_items
        self.max_len = max_len
        self.cloze = isinstance(backbone, BERT4Rec)
        self.items = nn.Embedding(num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.items.weight, std=init_std)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def loss(self, batch: dict[str, Tensor], loss: str, negatives: int,
             generator: torch.Generator | None = None) -> Tensor:
        """Training loss of one batch from `batches.next_item_batch` / `cloze_batch` (+ `add_negatives`)."""
        x = self.items(batch["inputs"])
        if self.cloze:
            states = self.backbone(x, batch["mask"], batch["masked"])
            rows = batch["masked"]
        else:
            states = self.backbone(x, batch["mask"])
            rows = batch["mask"]
        neg = batch["negatives"][rows] if "negatives" in batch else None
        return sequence_loss(states[rows], batch["targets"][rows], self.items, loss, self.num_items,
                             neg_ids=neg, num_negatives=negatives, generator=generator)

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[np.ndarray], batch_size: int = 512) -> Tensor:
        """[U, d] states that score each user's next item, from their (oldest-first) histories."""
        was_training = self.training
        self.eval()
        order = np.argsort([len(h) for h in histories], kind="stable")  # similar lengths batch together
        out = torch.empty(len(histories), self.items.embedding_dim)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = pad_right([histories[j] for j in idx], self.max_len)
            out[torch.from_numpy(idx)] = self.backbone.user_state(self.items(ids), mask)
        self.train(was_training)
        return out

    @torch.no_grad()
    def item_vectors(self) -> Tensor:
        """[num_items + 1, d] (row 0 = padding)."""
        return self.items.weight.detach().clone()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """state_dict as safetensors, written to a temporary name then renamed (never half a file)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes_atomic(path, save_safetensors(tensors))


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state_dict (no pickle involved); every key must match."""
    model.load_state_dict(load_file(str(path)))


# ---------------------------------------------------------------- training loop


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    stop_reason: str
    history: list[dict]
    train_seconds: float
    samples_per_s: float  # training sequences (one per user row) per second of training time
    predictions_per_s: float  # predicted positions (loss rows) per second
    checkpoint: str


def make_batch(model: Recommender, seqs: Sequence[np.ndarray], cfg: TrainConfig, mcfg: ModelConfig,
               rng: np.random.Generator, gen: torch.Generator) -> dict[str, Tensor]:
    """The training batch for one group of user sequences: next-item or Cloze, plus negatives if needed."""
    if model.cloze:
        batch = cloze_batch(seqs, mcfg.max_len, mcfg.mask_prob, rng, mcfg.last_only_prob)
    else:
        batch = next_item_batch(seqs, mcfg.max_len)
    if cfg.loss in ("bpr", "bce"):
        batch = add_negatives(batch, seqs, model.num_items, cfg.negatives, gen)
    return batch


Validate = Callable[[Recommender], dict[str, float]]


def fit_reference(model: Recommender, train_seqs: Sequence[np.ndarray], validate: Validate, cfg: TrainConfig,
                  mcfg: ModelConfig, run_dir: str | Path, monitor: str = "NDCG@10",
                  log: Callable[[str], None] = print) -> FitResult:
    """Train with Adam, validating every `eval_every` epochs; keep the best state on disk; stop on patience,
    `epochs`, or the `max_minutes` budget. The model ends holding the best checkpoint's weights."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Only sequences that yield at least one prediction row take part.
    seqs = [np.asarray(s, dtype=np.int64) for s in train_seqs if len(s) >= 2]
    lengths = np.array([min(len(s), mcfg.max_len + 1) for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    ckpt = Path(run_dir) / "best.safetensors"
    best, best_epoch, best_metrics, bad, history = -math.inf, 0, {}, 0, []
    train_seconds, n_samples, n_rows, stop, epoch = 0.0, 0, 0, "epochs", 0
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    fit_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = batch_order(lengths, cfg.batch_size, rng, cfg.bucket)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress, leave=False, mininterval=2)
        total, seen, t0 = 0.0, 0, time.perf_counter()
        for idx in bar:
            batch = make_batch(model, [seqs[i] for i in idx], cfg, mcfg, rng, gen)
            loss = model.loss(batch, cfg.loss, cfg.negatives, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            n_rows += int((batch["masked"] if model.cloze else batch["mask"]).sum())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if time.perf_counter() - fit_start > budget:
                stop = "time budget"
                break
        train_seconds += time.perf_counter() - t0
        n_samples += seen
        entry = {"epoch": epoch, "loss": total / max(1, seen), "train_seconds": round(train_seconds, 1)}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or stop != "epochs":
            t1 = time.perf_counter()
            metrics = validate(model)
            entry.update(metrics, eval_seconds=round(time.perf_counter() - t1, 2))
            if monitor not in metrics:
                raise KeyError(f"monitor metric {monitor!r} not among validation metrics {sorted(metrics)}")
            if metrics[monitor] > best:
                best, best_epoch, best_metrics, bad = metrics[monitor], epoch, metrics, 0
                save_checkpoint(model, ckpt)
            else:
                bad += 1
        history.append(entry)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        if stop != "epochs":
            break
        if bad >= cfg.patience:
            stop = "early stopping"
            break
    if ckpt.exists():
        load_checkpoint(model, ckpt)
    secs = max(train_seconds, 1e-9)
    return FitResult(best_epoch, best_metrics, epoch, stop, history, round(train_seconds, 2),
                     round(n_samples / secs, 1), round(n_rows / secs, 1), str(ckpt) if ckpt.exists() else "")


# ---------------------------------------------------------------- data and evaluation glue


@dataclass
class LeaveOneOutData:
    """Leave-one-out sequences with items re-indexed densely to 1..num_items for the local table."""

    item_ids: np.ndarray  # [num_items] raw item id of index i + 1
    train_seqs: list[np.ndarray]  # per user, dense indices, oldest first (all but the last two items)
    valid: EvalSet  # target = second-to-last item, history = train items (raw ids)
    test: EvalSet  # target = last item, history = train + valid items
    stats: dict
    sequences: pa.Table | None = None  # train sequences with raw ids (user_id, items, timestamps)


def load_leave_one_out(cfg: ReferenceDataConfig) -> LeaveOneOutData:
    """MovieLens -> implicit feedback, k-core -> leave-one-out (SASRec / BERT4Rec protocol)."""
    data = prepare(MovieLensConfig(dataset=cfg.dataset, min_rating=cfg.min_rating, k_core=cfg.k_core))
    return leave_one_out_data(data.interactions, cfg.dataset)


def leave_one_out_data(interactions: pa.Table, name: str,
                       per_domain_catalogue: bool = False) -> LeaveOneOutData:
    """Canonical interactions -> one time-ordered sequence per user -> leave-one-out train/valid/test
    (the engine's `leave_one_out` recipe, in memory). With `per_domain_catalogue`, a target is ranked
    only against items of its own domain."""
    split = split_interactions(interactions, RecipeConfig(per_domain_catalogue=per_domain_catalogue), name)
    seqs = split.train_sequences(with_domains=False)
    train_seqs = [np.searchsorted(split.item_ids, np.asarray(h, dtype=np.int64)) + 1
                  for h in seqs["items"].to_pylist()]
    valid, test = (EvalSet(s.rows.select(["user_id", "item_id", "domain", "history"]), s.catalogue, s.item_counts,
                           name=s.name) for s in split.eval_sets())
    stats = {k: split.stats[k] for k in ("users", "items", "interactions", "train_interactions")}
    return LeaveOneOutData(split.item_ids, train_seqs, valid, test, stats, seqs)


class Evaluation:
    """Scores a Recommender on one EvalSet under several candidate modes; sampled candidates are drawn
    once, so every validation ranks the same negatives. Results are flat: {"uniform:100/ndcg@10": ...}."""

    def __init__(self, data: EvalSet, item_ids: np.ndarray, cfg: ReferenceEvalConfig):
        self.data, self.item_ids = data, torch.as_tensor(item_ids)
        self.configs = [
            EvalConfig(candidates=c, ks=list(cfg.ks), seed=cfg.seed, user_batch=cfg.batch_size)
            for c in cfg.candidates
        ]
        self.candidates = [prepare_candidates(data, c.spec()) for c in self.configs]
        hist = data.rows["history"].to_pylist()
        self.histories = [np.searchsorted(item_ids, np.asarray(h, dtype=np.int64)) + 1 for h in hist]
        self.users = torch.as_tensor(np.array(data.user_ids()))

    def __call__(self, model: Recommender) -> dict[str, float]:
        scorer = EmbeddingScorer(self.users, model.user_vectors(self.histories), self.item_ids,
                                 model.item_vectors()[1:])
        out = {}
        for cfg, cands in zip(self.configs, self.candidates):
            overall = evaluate(scorer, self.data, cfg, cands).summary()["overall"]["all"]
            out.update({f"{cfg.candidates}/{k}": float(v) for k, v in overall.items() if k != "count"})
        return out


def run_reference(cfg: ReferenceConfig) -> dict:
    """The train-reference job: load, split, train with early stopping, test the best checkpoint."""
    run_dir = claim_output_dir(cfg.run_dir, "run_dir", overwrite=cfg.overwrite)
    t0 = time.time()
    data = load_leave_one_out(cfg.data)
    print(f"data: {data.stats} ({time.time() - t0:.1f}s)")
    valid = Evaluation(data.valid, data.item_ids, cfg.eval)
    test = Evaluation(data.test, data.item_ids, cfg.eval)
    torch.manual_seed(cfg.train.seed)
    model = Recommender(make_backbone(cfg.model), len(data.item_ids), cfg.model.d, cfg.model.init_std,
                        cfg.model.max_len)
    if cfg.init_checkpoint:
        load_checkpoint(model, cfg.init_checkpoint)
    monitor = f"{cfg.eval.candidates[0]}/{cfg.eval.monitor}"
    result = fit_reference(model, data.train_seqs, valid, cfg.train, cfg.model, run_dir, monitor)
    t1 = time.perf_counter()
    test_metrics = test(model)
    return {
        "run_dir": str(run_dir),
        "data": data.stats,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test": test_metrics,
        "test_eval_seconds": round(time.perf_counter() - t1, 2),
        "valid": result.best_metrics,
        **{k: v for k, v in asdict(result).items() if k != "best_metrics"},
    }
