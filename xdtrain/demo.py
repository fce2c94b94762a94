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
    overwrite: bool = False  # write into an existing non-empty run_dir that xdtrain did not create


def run_demo(cfg: DemoConfig) -> dict:
    engine_cfg = load_config(EngineConfig, cfg.config, [f"run_dir={cfg.run_dir}", f"overwrite={cfg.overwrite}"])
    summary = train(engine_cfg)
    model, pop = summary["test"]["seqrec"]["full"], summary["test"]["pop"]["full"]
    print("\n[demo] test split, full-catalogue ranking within each domain (best checkpoint, "
          f"step {summary['best_step']}):")
    print(f"  {'':10} {'HR@10':>8} {'NDCG@10':>8} {'MRR':>8}")
    for name, m in (("SASRec", model), ("POP", pop)):
        print(f"  {name:10} {m['hr@10']:8.4f} {m['ndcg@10']:8.4f} {m['mrr']:8.4f}")
    print(f"[demo] NDCG@10 {model['ndcg@10'] / max(pop['ndcg@10'], 1e-12):.2f}x popularity; "
          f"{summary['steps']} steps on {engine_cfg.scale.workers} workers + {engine_cfg.ps.shards}-shard PS "
          f"in {summary['fit_seconds']}s")
    print(f"[demo] run directory: {summary['run_dir']} (metrics.json, curves.jsonl, test/, embeddings/)")
    print(f"[demo] report: {summary['report']}  (re-render: xdtrain report {summary['run_dir']})")
    return summary
