"""`make demo`: generate a synthetic 3-domain world, train a cross-domain SASRec, compare with popularity.

Until the distributed engine lands this is the single-process path (reference trainer, local
tables); the engine issue turns it into a 2-worker Ray Train run with a 2-shard PS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch

from xdtrain.config import load_config
from xdtrain.data.synthetic import WorldConfig, generate_world
from xdtrain.eval.evaluator import EmbeddingScorer, EvalConfig, evaluate
from xdtrain.eval.report import to_markdown, write_report
from xdtrain.jobrunner import write_json_atomic
from xdtrain.train.reference import EvalConfig as RefEvalConfig
from xdtrain.train.reference import (
    Evaluation,
    ModelConfig,
    Recommender,
    TrainConfig,
    fit,
    leave_one_out_data,
    make_backbone,
)


@dataclass
class DemoConfig:
    run_dir: str = "runs/demo"
    world_config: str = "configs/world_demo.yaml"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(d=48, max_len=50, dropout=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, eval_every=2, patience=3,
                                                                   max_minutes=4.0, batch_size=128))
    candidates: str = "full"


def popularity_scorer(train_seqs: list[np.ndarray], item_ids: np.ndarray, users: torch.Tensor) -> EmbeddingScorer:
    """POP baseline as a dot product: every user vector is 1, an item's vector is its training count."""
    counts = np.bincount(np.concatenate(train_seqs), minlength=len(item_ids) + 1)[1:].astype(np.float32)
    return EmbeddingScorer(users, torch.ones(len(users), 1), torch.as_tensor(item_ids),
                           torch.as_tensor(counts).unsqueeze(1))


def run_demo(cfg: DemoConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    t0 = time.time()
    world_dir = run_dir / "world"
    world_cfg = load_config(WorldConfig, cfg.world_config, ["output.overwrite=true", f"out={world_dir}"])
    summary = generate_world(world_cfg, str(world_dir), progress=True)
    print(f"[demo] world: {summary['counts']['n_interactions']} interactions, "
          f"{summary['counts']['n_users']} users, {len(world_cfg.domains)} domains -> {world_dir}")

    interactions = pads.dataset(str(world_dir / "interactions"), format="parquet").to_table(
        columns=["user_id", "item_id", "domain", "timestamp"])
    data = leave_one_out_data(interactions, "demo world", per_domain_catalogue=True)
    print(f"[demo] leave-one-out: {data.stats}")

    eval_cfg = RefEvalConfig(candidates=[cfg.candidates], ks=[10])
    valid = Evaluation(data.valid, data.item_ids, eval_cfg)
    torch.manual_seed(cfg.train.seed)
    model = Recommender(make_backbone(cfg.model), len(data.item_ids), cfg.model.d, cfg.model.init_std,
                        cfg.model.max_len)
    result = fit(model, data.train_seqs, valid, cfg.train, cfg.model, run_dir / "sasrec",
                 f"{cfg.candidates}/ndcg@10")

    # Test: SASRec and popularity ranked on the same candidates, reported per domain.
    test_cfg = EvalConfig(candidates=cfg.candidates, ks=[10, 20])
    test = Evaluation(data.test, data.item_ids, eval_cfg)
    sasrec = EmbeddingScorer(test.users, model.user_vectors(test.histories), test.item_ids,
                             model.item_vectors()[1:])
    pop = popularity_scorer(data.train_seqs, data.item_ids, test.users)
    results = {name: evaluate(scorer, data.test, test_cfg) for name, scorer in [("sasrec", sasrec), ("pop", pop)]}
    for name, res in results.items():
        write_report(res, str(run_dir / f"test_{name}"))
    table = {name: res.summary() for name, res in results.items()}
    out = {
        "run_dir": str(run_dir),
        "world": summary["counts"],
        "data": data.stats,
        "train": {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                  "samples_per_s": result.samples_per_s, "stop_reason": result.stop_reason},
        "test": {name: s["overall"]["all"] for name, s in table.items()},
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(run_dir / "demo_metrics.json", {**out, "test_summary": table})
    print("\n[demo] test, full-catalogue ranking within each domain:")
    for name in results:
        print(f"\n## {name}\n{to_markdown(table[name])}")
    s, p = out["test"]["sasrec"]["ndcg@10"], out["test"]["pop"]["ndcg@10"]
    print(f"\n[demo] NDCG@10 SASRec {s:.4f} vs popularity {p:.4f} ({s / max(p, 1e-12):.2f}x); "
          f"reports under {run_dir}/ (test_sasrec/, test_pop/, demo_metrics.json)")
    return out
