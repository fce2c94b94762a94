"""RecGURU training throughput per stage (pretrain, adversarial critic and generator steps,
fine-tune) on the engine, 1 worker + in-process PS against 2 workers + a 2-shard Ray PS, in one run.

    python -m bench.recguru_bench [--users-a 600 --users-b 3000] [--json out.json]

The synthetic two-domain world (sparse target `a`, dense source `b`; xdtrain/data/synthetic/two_domain.py)
through configs/recguru_synthetic.yaml, `model.job=all` (the three phases in one run). Each setup
runs in its own process:
  (a) engine 1w local PS   1 Ray Train worker, the in-process PS (the baseline)
  (b) engine 2w 2-shard PS 2 workers (DDP over gloo) + a 2-shard Ray PS
Samples/s are rows of a step's streams per second, from the engine's per-iteration records
(log_every 1; a record's losses tell the step; the first record of each stage is warm-up and
dropped). Both setups also print their test HR@10 / NDCG@10 on domain `a` (99 uniform negatives,
as scripts/recguru_synthetic.py): the same config on either setup should give matching metrics.
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

CONFIG = "configs/recguru_synthetic.yaml"
STAGES = ("pretrain", "critic", "generator", "finetune")


def stage_of(record: dict) -> str | None:
    """The stage of one per-iteration train record (None: not a train record)."""
    if record.get("kind") != "train" or not record.get("losses"):
        return None
    if record.get("phase") == "adversarial":
        return "critic" if "critic" in record["losses"] else "generator"
    return record.get("phase")


def overrides(world: str, args) -> list[str]:
    return [f"data.interactions_url={world}/interactions", "model.job=all", f"model.d={args.d}",
            f"model.pretrain_steps={args.pretrain_steps}", f"model.adv_iterations={args.adv_iterations}",
            f"train.epochs={args.ft_epochs}", "train.patience=0", "eval.candidates=[uniform:99]",
            "eval.groups=[domain]", "eval.baselines=[]"]


def phase_engine(args) -> dict:
    summary, recs = run_engine(CONFIG, overrides(args.world, args), args.workers, args.backend, args.shards)
    rates: dict[str, list[float]] = {s: [] for s in STAGES}
    for r in recs:
        if (stage := stage_of(r)) is not None:
            rates[stage].append(r["samples_per_s"])
    test = summary["test"]["recguru"]["uniform:99"]
    return {**{k: statistics.median(v[1:] or v) for k, v in rates.items() if v},
            "test_hr@10": test["hr@10"], "test_ndcg@10": test["ndcg@10"], "fit_seconds": summary["fit_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users-a", type=int, default=600)
    p.add_argument("--users-b", type=int, default=3000)
    p.add_argument("--overlap", type=float, default=0.1)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--adv-iterations", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--world", default="", help=argparse.SUPPRESS)
    add_phase_args(p)
    args = p.parse_args()
    if args.phase:
        report_result(phase_engine(args))
        return
    from xdtrain.data.synthetic.two_domain import main as write_world

    sizes = ["--users-a", str(args.users_a), "--users-b", str(args.users_b), "--d", str(args.d),
             "--pretrain-steps", str(args.pretrain_steps), "--adv-iterations", str(args.adv_iterations),
             "--ft-epochs", str(args.ft_epochs)]
    with tempfile.TemporaryDirectory() as tmp:
        write_world(["--out", tmp, "--users-a", str(args.users_a), "--users-b", str(args.users_b),
                     "--overlap", str(args.overlap)])
        common = ["-m", "bench.recguru_bench", *sizes, "--phase", "engine", "--world", tmp]
        setups = {
            "(a) engine 1w local PS": ["--workers", "1", "--backend", "local", "--shards", "1"],
            "(b) engine 2w 2-shard PS": ["--workers", "2", "--backend", "ray", "--shards", "2"],
        }
        print(f"recguru bench: {CONFIG}, world {args.users_a} + {args.users_b} users, overlap {args.overlap}, "
              f"d {args.d}, {args.pretrain_steps} pretrain steps, {args.adv_iterations} generator iterations "
              f"(x6 engine iterations), {args.ft_epochs} fine-tune epochs; load {os.getloadavg()[0]:.2f}", flush=True)
        results = {name: run_phase(common + extra, timeout=3600) for name, extra in setups.items()}
    base = results["(a) engine 1w local PS"]
    print(f"\n{'setup':<26}" + "".join(f" {s + ' /s':>14} {'ratio':>6}" for s in STAGES)
          + f" {'test HR@10':>11} {'NDCG@10':>8} {'fit s':>6}")
    for name, r in results.items():
        cells = "".join(f" {r.get(s, float('nan')):>14,.0f} {r.get(s, float('nan')) / base.get(s, float('nan')):>6.2f}"
                        for s in STAGES)
        print(f"{name:<26}{cells} {r['test_hr@10']:>11.4f} {r['test_ndcg@10']:>8.4f} {r['fit_seconds']:>6.0f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
