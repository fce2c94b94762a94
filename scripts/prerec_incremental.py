"""PreRec incremental fine-tuning on ML-1M held-out markets, like the paper's Fig. 3 (sec. 4.5).

For every N (first N next-item train samples of the held-out markets, `data.max_train_samples`;
0 = the whole train split, i.e. full fine-tuning) it runs three engine jobs:

    PreRec    jobs.finetune from the pre-trained PreRec checkpoint
    PreRec_n  jobs.finetune from the pre-trained PreRec_n checkpoint (no bias terms)
    scratch   jobs.pretrain: PreRec trained on the same N samples only (the in-domain baseline)

plus the two zero-shot points (jobs.evaluate, N = 0 target samples), then writes results.json,
prints a Markdown table and draws the plot. A run whose metrics.json exists is not run again, so
an interrupted sweep continues where it stopped. Pre-train first (docs/results/prerec.md).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/prerec_incremental.py
    .venv/bin/python scripts/prerec_incremental.py --plot-only      # table and plot from results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HELD_OUT = "[zip3,zip8]"
CONFIGS = {"PreRec": "configs/prerec_ml1m_zip.yaml", "PreRec_n": "configs/prerec_n_ml1m_zip.yaml",
           "scratch": "configs/prerec_ml1m_zip.yaml"}
STYLE = {"PreRec": ("C0", "-", "o"), "PreRec_n": ("C1", "-", "s"), "scratch": ("C2", "--", "^")}
BASELINES = ("pop", "sbert")  # non-learned references drawn as grey lines
LABEL = {"PreRec": "PreRec (pre-trained, fine-tuned)", "PreRec_n": "PreRec_n (pre-trained, fine-tuned)",
         "scratch": "PreRec* (trained from scratch)"}


def checkpoint_of(run_dir: str) -> str:
    """The checkpoint a pre-training run tested (its best validated one)."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())["checkpoint"]


def common(args: argparse.Namespace) -> list[str]:
    """Settings shared by every training run of the sweep (sized for a shared 2-core CPU)."""
    return [f"data.train_domains={HELD_OUT}", f"data.eval_domains={HELD_OUT}", f"model.text_cache={args.text_cache}",
            "model.chunk=true",  # every one of the N samples is a training target in each epoch
            f"train.lr={args.lr}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
            f"train.patience={args.patience}", f"train.max_minutes={args.max_minutes}",
            "train.eval_at_start=true",  # the starting model is a candidate (the authors validate at epoch 0)
            "scale.workers=1", "ps.backend=local", "train.progress=false"]


def commands(args: argparse.Namespace) -> dict[tuple[str, int], list[str]]:
    """(method, N) -> the job command line (its run_dir is `run_dir_of`); N = -1 is zero-shot."""
    py, out = sys.executable, Path(args.out)
    ckpt = {"PreRec": checkpoint_of(args.pre), "PreRec_n": checkpoint_of(args.pre_n)}
    cmds = {}
    for method in sorted({"PreRec", "PreRec_n"} & set(args.methods)):
        cmds[(method, -1)] = [
            py, "-m", "jobs.evaluate", "--config", CONFIGS[method], f"run_dir={out / f'{method}_zs'}",
            f"init_from={ckpt[method]}", "data.train_domains=[]", f"data.eval_domains={HELD_OUT}",
            "model.inference=zero_shot", "ps.backend=local", f"model.text_cache={args.text_cache}"]
    for n in args.ns:
        for method in args.methods:
            job = "jobs.pretrain" if method == "scratch" else "jobs.finetune"
            init = [] if method == "scratch" else [f"init_from={ckpt[method]}"]
            cmds[(method, n)] = [py, "-m", job, "--config", CONFIGS[method], f"run_dir={out / f'{method}_N{n}'}",
                                 *init, *common(args), f"data.max_train_samples={n}"]
    return cmds


def run_dir_of(cmd: list[str]) -> Path:
    return Path(next(c for c in cmd if c.startswith("run_dir=")).split("=", 1)[1])


def run_all(args: argparse.Namespace) -> None:
    for cmd in commands(args).values():
        run_dir = run_dir_of(cmd)
        if (run_dir / "metrics.json").exists():
            continue
        print("$ " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        with open(Path(args.out) / f"{run_dir.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  done in {time.time() - t0:.0f} s", flush=True)


def collect(args: argparse.Namespace) -> list[dict]:
    rows, evals = [], set()
    for (method, n), cmd in commands(args).items():
        run_dir = run_dir_of(cmd)
        if not (run_dir / "metrics.json").exists():  # --plot-only on a partial sweep
            continue
        m = json.loads((run_dir / "metrics.json").read_text())
        evals.add(json.dumps(m["config"]["eval"], sort_keys=True))
        # the zero-shot job also scores the non-learned baselines (POP, text-only SBERT) on the same rows
        done = {r["method"] for r in rows}
        scored = [(method, "prerec")] + [(b.upper(), b) for b in BASELINES
                                         if n < 0 and b in m["test"] and b.upper() not in done]
        for name, key in scored:
            test = m["test"][key]["full"]
            rows.append({"method": name, "n": n, "train_samples": (m.get("data") or {}).get("train_samples", 0)
                         if n >= 0 else 0, "steps": m.get("steps", 0), "best_step": m.get("best_step"),
                         "stop": m.get("stop_reason", "zero-shot") if key == "prerec" else "no training",
                         "seconds": m.get("wall_seconds"),
                         **{k: v for k, v in test.items() if "@" in k or k == "count"}})
    if len(evals) > 1:  # the configs changed between runs: the points are not comparable
        print(f"WARNING: the runs used {len(evals)} different eval sections: {sorted(evals)}")
    return rows


def incremental_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if "@" in k]
    lines = ["| method | N (train samples) | " + " | ".join(keys) + " | steps (best) | stop |",
             "|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] in ("POP", "SBERT"), r["method"],
                                         r["n"] if r["n"] != 0 else 1 << 40)):
        n = "zero-shot" if r["n"] < 0 else f"{r['train_samples']:,}" + (" (all)" if r["n"] == 0 else "")
        steps = "-" if r["n"] < 0 else f"{r['steps']} ({r['best_step']})"
        lines.append(f"| {r['method']} | {n} | " + " | ".join(f"{r[k]:.4f}" for k in keys)
                     + f" | {steps} | {r['stop']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """NDCG@10, and the paper's r-NDCG@K% beside it when the runs measured it."""
    if not any(r["n"] >= 0 for r in rows):
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = ["ndcg@10"] + [k for k in rows[0] if k.startswith("rndcg@") and k.endswith("%")][:1]
    fig = Figure(figsize=(5.6 * len(metrics), 4.2))
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for method, (color, ls, marker) in STYLE.items():
            pts = sorted((r["train_samples"], r[metric]) for r in rows if r["method"] == method and r["n"] >= 0)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, marker=marker,
                    label=LABEL[method])
            zs = [r[metric] for r in rows if r["method"] == method and r["n"] < 0]
            if zs:
                ax.axhline(zs[0], color=color, ls=":", lw=1, label=f"{method} zero-shot")
        for name, ls in zip((b.upper() for b in BASELINES), ("-.", "--")):
            ref = [r[metric] for r in rows if r["method"] == name]
            if ref:
                ax.axhline(ref[0], color="grey", ls=ls, lw=1, label=f"{name} (no training)")
        ax.set_xscale("log")
        ax.set_xlabel("target training samples N (last point: the whole train split)")
        ax.set_ylabel(f"{metric} (held-out markets zip3 + zip8)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("PreRec incremental fine-tuning on ML-1M markets (like the paper's Fig. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[100, 1000, 10000, 0], help="N per point (0 = all)")
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--pre", default="runs/prerec_exp/pre", help="PreRec pre-training run dir")
    p.add_argument("--pre-n", default="runs/prerec_exp/pre_n", help="PreRec_n pre-training run dir")
    p.add_argument("--text-cache", default=str(Path("runs/prerec_exp/text_cache").resolve()))
    p.add_argument("--out", default="runs/prerec_incremental")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam, every method (paper: 3e-4 for both stages)")
    p.add_argument("--batch-size", type=int, default=16, help="rows (windows of up to 51 items) per step")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--max-minutes", type=float, default=8.0, help="wall budget per run (a safety cap)")
    p.add_argument("--plot", default="docs/results/prerec_incremental.png")
    p.add_argument("--plot-only", action="store_true", help="no runs: table and plot from what is there")
    return p


def main() -> None:
    args = parser().parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        run_all(args)
    rows = collect(args)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))
    print(incremental_table(rows))
    plot(rows, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
