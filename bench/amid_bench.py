"""AMID training throughput per stage (O: eq. 13 + the propensity on O/P; D: eq. 15 on D), in one run.

    python -m bench.amid_bench [--epochs 1] [--json out.json]

configs/amid_ml1m.yaml at the CPU size of scripts/amid_table.py (d 32, T 10, one layer, batch
128), AMID with SASRec; each phase runs in its own process:
  (a) in-process loop  the same program without Ray or the engine (xdtrain/train/local_program.py)
  (b) engine 1w        the engine, 1 Ray Train worker, in-process PS
  (c) engine 2w        the engine, 2 workers (DDP over gloo) + a 2-shard Ray PS
Samples/s are rows of the step's main stream per second: the engine's from its per-iteration
progress records (log_every 1; a record's losses tell the stage; the first of each stage is
warm-up and dropped), the loop's from timing each iteration. Ratios are against (a). The engine
phases also print their test NDCG@10 (same config, same fixed negatives).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_phase_args, report_result, run_engine, run_phase  # noqa: E402

CONFIG = "configs/amid_ml1m.yaml"
SIZE = ["model.d=32", "model.max_len=10", "model.layers=1", "model.heads=2", "train.batch_size=128"]


def _median_by_stage(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v[1:] or v) for k, v in samples.items() if v}


def phase_loop(args) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from xdtrain.config import load_config
    from xdtrain.models import build_model
    from xdtrain.ps import LocalPS
    from xdtrain.train.config import EngineConfig
    from xdtrain.train.datasets import prepare_data
    from xdtrain.train.local_program import run_epochs
    from xdtrain.train.plan import program_for

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(EngineConfig, CONFIG, [*SIZE, f"train.epochs={args.epochs}"])
        data = prepare_data(cfg.data, tmp)
        model = build_model(cfg.model, data.model_data, cfg.train.seed)
        ps = LocalPS(1)
        for spec in model.sparse_tables():
            ps.create_table(spec)
        rates: dict[str, list[float]] = {"O": [], "D": []}
        run_epochs(model, ps, program_for(model, cfg.train), {k: pq.read_table(v) for k, v in data.streams.items()},
                   np.random.default_rng(0),
                   on_iteration=lambda st, n, s: rates["D" if st.label == "dr" else "O"].append(n / s))
    return _median_by_stage(rates)


def phase_engine(args) -> dict:
    s, recs = run_engine(CONFIG, [*SIZE, f"train.epochs={args.epochs}", "train.patience=0"], args.workers,
                         args.backend, args.shards)
    rates: dict[str, list[float]] = {"O": [], "D": []}
    for r in recs:
        if r["kind"] == "train" and r.get("losses"):
            rates["D" if "debias" in r["losses"] else "O"].append(r["samples_per_s"])
    test = next(iter(s["test"]["amid"].values()))
    return {**_median_by_stage(rates), "test_ndcg@10": test["ndcg@10"], "fit_seconds": s["fit_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--json", default="")
    add_phase_args(p)
    args = p.parse_args()
    if args.phase:
        report_result(phase_loop(args) if args.phase == "loop" else phase_engine(args))
        return
    common = ["-m", "bench.amid_bench", "--epochs", str(args.epochs)]
    phases = {
        "(a) in-process loop": ["--phase", "loop"],
        "(b) engine 1w local PS": ["--phase", "engine", "--workers", "1", "--backend", "local"],
        "(c) engine 2w 2-shard PS": ["--phase", "engine", "--workers", "2", "--backend", "ray", "--shards", "2"],
    }
    print(f"amid bench: {CONFIG} {' '.join(SIZE)}, AMID (SASRec), {args.epochs} epoch(s); "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    results = {name: run_phase(common + extra, timeout=3600) for name, extra in phases.items()}
    base = results["(a) in-process loop"]
    print(f"\n{'phase':<26} {'O samples/s':>12} {'vs (a)':>7} {'D samples/s':>12} {'vs (a)':>7} {'test NDCG@10':>13}")
    for name, r in results.items():
        ndcg = f"{r['test_ndcg@10']:13.4f}" if "test_ndcg@10" in r else f"{'-':>13}"
        print(f"{name:<26} {r['O']:>12.0f} {r['O'] / base['O']:>7.2f} {r['D']:>12.0f} "
              f"{r['D'] / base['D']:>7.2f} {ndcg}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
