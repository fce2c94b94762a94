"""Training throughput: the engine against the single-process reference trainer, in the same run.

    python -m bench.train_bench [--dataset ml-1m] [--epochs 2] [--json out.json]

Same model (SASRec, BCE with one negative per position), same leave-one-out train sequences, same
global batch; each phase runs in its own process:
  (a) reference   the single-process trainer with a local nn.Embedding item table (1 torch thread)
  (b) engine-1w   the engine, 1 Ray Train worker, in-process PS backend
  (c) engine-2w   the engine, 2 workers (DDP over gloo) + 2-shard Ray PS, prefetch off / on
  with --gpu (one GPU): (d) engine-1w on the GPU, in-process PS; (e) engine-1w on the GPU, 2-shard Ray PS
  with prefetch (rows pulled on the CPU side and moved to the GPU each step)
Samples/s is training sequences per second of training time (the engine's from its progress
records, which exclude validation and checkpoints; the first record of a run is warm-up and
dropped). Ratios are against (a). Also printed: PS rows and bytes moved per training sample.
The reference's length bucketing is off (bucket=1) so both read rows in plain shuffled order.
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

from bench.common import report_result, run_phase  # noqa: E402

MODEL = {"d": 50, "max_len": 200, "layers": 2, "heads": 1, "dropout": 0.2}


def phase_reference(args) -> dict:
    from xdtrain.nn import make_backbone
    from xdtrain.reference.trainer import (
        ModelConfig,
        Recommender,
        ReferenceDataConfig,
        TrainConfig,
        fit_reference,
        load_leave_one_out,
    )

    data = load_leave_one_out(ReferenceDataConfig(dataset=args.dataset))
    mcfg = ModelConfig(backbone="sasrec", **MODEL)
    tcfg = TrainConfig(loss="bce", batch_size=args.batch_size, epochs=args.epochs, bucket=1, threads=1,
                       progress=False, eval_every=args.epochs + 1)
    model = Recommender(make_backbone(mcfg), len(data.item_ids), mcfg.d, mcfg.init_std, mcfg.max_len)
    with tempfile.TemporaryDirectory() as tmp:
        res = fit_reference(model, data.train_seqs, lambda m: {"x": 0.0}, tcfg, mcfg, tmp, "x", log=lambda s: None)
    return {"samples_per_s": res.samples_per_s, "train_seconds": res.train_seconds}


def phase_engine(args) -> dict:
    from xdtrain.config import load_config
    from xdtrain.localray import init_local
    from xdtrain.train.config import EngineConfig
    from xdtrain.train.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        over = [f"run_dir={tmp}/run", "data.source=movielens", f"data.dataset={args.dataset}",
                "data.per_domain_catalogue=false", "model.name=seqrec", "model.backbone=sasrec",
                *[f"model.{k}={v}" for k, v in MODEL.items()], f"scale.workers={args.workers}",
                f"ps.backend={args.backend}", f"ps.shards={args.shards}", f"ps.prefetch={args.prefetch}",
                f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.eval_every=0",
                "train.log_every=5", "train.progress=false", "export_embeddings=false", "eval.baselines=[]",
                "eval.candidates=[uniform:100]", f"scale.use_gpu={args.gpu}"]
        cfg = load_config(EngineConfig, "configs/demo.yaml", over)
        init_local(num_cpus=max(2, args.workers), resources={"ps": 8.0, "trainer": 4.0}, include_dashboard=False,
                   log_to_driver=False)
        s = train(cfg)
        recs = [json.loads(x) for x in Path(tmp, "run", "curves.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"][1:]
    sps = statistics.median(r["samples_per_s"] for r in train_recs)
    rows = statistics.median(r["ps_rows_per_s"] / r["samples_per_s"] for r in train_recs)
    return {"samples_per_s": sps, "ps_rows_per_sample": rows,
            "ps_rows_per_s": statistics.median(r["ps_rows_per_s"] for r in train_recs),
            "ps_bytes_per_sample": rows * MODEL["d"] * 4,
            "fit_seconds": s["fit_seconds"], "steps": s["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", default="")
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="local", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", default="true", help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="run only these phases, by letter (e.g. 'a,d'); (a) or the first "
                   "phase run is the baseline of the ratios")
    p.add_argument("--gpu", action="store_true", help="add the GPU phases (d) and (e); needs one CUDA device")
    args = p.parse_args()
    if args.phase:
        report_result(phase_reference(args) if args.phase == "reference" else phase_engine(args))
        return
    common = ["-m", "bench.train_bench", "--dataset", args.dataset, "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size)]
    phases = {
        "(a) reference": ["--phase", "reference"],
        "(b) engine 1w local PS": ["--phase", "engine", "--workers", "1", "--backend", "local"],
        "(c) engine 2w 2-shard PS": ["--phase", "engine", "--workers", "2", "--backend", "ray", "--shards", "2",
                                     "--prefetch", "false"],
        "(c) + prefetch": ["--phase", "engine", "--workers", "2", "--backend", "ray", "--shards", "2",
                           "--prefetch", "true"],
    }
    if args.gpu:
        phases["(d) engine 1w local PS, GPU"] = ["--phase", "engine", "--workers", "1", "--backend", "local", "--gpu"]
        phases["(e) engine 1w 2-shard PS, GPU"] = ["--phase", "engine", "--workers", "1", "--backend", "ray",
                                                  "--shards", "2", "--prefetch", "true", "--gpu"]
    if args.only:
        keep = {f"({x.strip()})" for x in args.only.split(",")}
        phases = {k: v for k, v in phases.items() if k.split()[0] in keep}
    print(f"train bench: {args.dataset}, SASRec {MODEL}, batch {args.batch_size}, {args.epochs} epochs; "
          f"load {os.getloadavg()[0]:.2f}")
    results = {}
    for name, extra in phases.items():
        results[name] = run_phase(common + extra, timeout=3600)
        print(f"  {name}: {results[name]['samples_per_s']:.0f} samples/s", flush=True)
    base_name = next(iter(results))
    base = results[base_name]["samples_per_s"]
    print(f"\n{'phase':<30} {'samples/s':>10} {'vs ' + base_name.split()[0]:>7} {'PS rows/sample':>15} "
          f"{'PS KiB/sample':>14} {'PS rows/s':>10}")
    for name, r in results.items():
        rows = r.get("ps_rows_per_sample")
        kib = f"{r['ps_bytes_per_sample'] / 1024:14.1f}" if rows else f"{'-':>14}"
        rps = f"{r['ps_rows_per_s']:10.0f}" if rows else f"{'-':>10}"
        print(f"{name:<30} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / base:>7.2f} "
              f"{(f'{rows:15.1f}' if rows else f'{chr(45):>15}')} {kib} {rps}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
