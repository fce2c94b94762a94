"""`make demo`: the main job on an embedded local Ray, end to end.

Generates a small 3-domain synthetic world, pre-trains a cross-domain SASRec with 2 Ray Train
workers and a 2-shard Ray PS (configs/demo.yaml), tests the best checkpoint against popularity on
each domain's full catalogue, exports the item embeddings, and renders the run report.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdtrain.config import load_config
from xdtrain.train.config import EngineConfig
from xdtrain.train.engine import train


@dataclass
class DemoConfig:
    config: str = "configs/demo.yaml"  # the engine config the demo runs
    run_dir: str = "runs/demo"
    verbose: bool = False  # true: Ray's own output on the console (else <run_dir>/logs/ray.log)
    overwrite: bool = False  # write into an existing non-empty run_dir that xdtrain did not create


def run_demo(cfg: DemoConfig) -> dict:
    """Train and test; the job runner prints the results table (test: scorer x metric)."""
    overrides = [f"run_dir={cfg.run_dir}", f"overwrite={cfg.overwrite}"] + (["verbose=true"] if cfg.verbose else [])
    engine_cfg = load_config(EngineConfig, cfg.config, overrides)
    summary = train(engine_cfg)
    model, pop = summary["test"]["seqrec"]["full"], summary["test"]["pop"]["full"]
    print(f"[demo] NDCG@10 {model['ndcg@10']:.4f} vs popularity {pop['ndcg@10']:.4f} "
          f"({model['ndcg@10'] / max(pop['ndcg@10'], 1e-12):.2f}x; full catalogue of each domain, best checkpoint "
          f"step {summary['best_step']}); {summary['steps']} steps on {engine_cfg.scale.workers} workers + "
          f"{engine_cfg.ps.shards}-shard PS in {summary['fit_seconds']} s")
    return summary
