"""Every run behind docs/results/prerec.md, resumable: a run whose metrics.json exists is skipped.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/prerec_runs.py runs/prerec_v2 --seeds 0 1 2
    .venv/bin/python scripts/prerec_tables.py runs/prerec_v2 --seeds 0 1 2

Per seed and model (PreRec, PreRec_n): pre-training on the 8 source markets (2 Ray Train workers,
2-shard Ray PS), zero-shot on the held-out markets zip3 + zip8 and on ML-100K as a new platform,
fine-tuning on zip3 + zip8; then the twin-free setting: pre-training without the ML-1M movies whose
title ML-100K has too, and zero-shot on ML-100K from it. Each job's output goes to <exp>/<run>.log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

MODELS = ("prerec", "prerec_n")
HELD_OUT = ["data.train_domains=[]", "data.eval_domains=[zip3,zip8]", "model.inference=zero_shot",
            "ps.backend=local"]
ML100K = ["data.dataset=ml-1m+ml-100k", "data.domains=platform", "data.train_domains=[]",
          "data.eval_domains=[ml-100k]", "data.source_domains=[ml-1m]", "model.inference=zero_shot",
          "ps.backend=local"]
FINETUNE = ["data.train_domains=[zip3,zip8]", "data.eval_domains=[zip3,zip8]", "train.epochs=10",
            "train.max_minutes=6", "train.patience=2"]
TWIN_FREE = ["data.exclude_title_twins=ml-100k"]


class Job(NamedTuple):
    run: str  # run folder name under the experiment folder
    module: str  # jobs.pretrain | jobs.evaluate | jobs.finetune
    config: str
    overrides: list[str]
    init_from: str = ""  # the run whose tested checkpoint this job starts from


def jobs(seeds: list[int]) -> list[Job]:
    """The experiment's jobs in run order (a job comes after the run it starts from)."""
    out = []
    for twin_free in (False, True):
        for seed in seeds:
            for m in MODELS:
                config = f"configs/{m}_ml1m_zip.yaml"
                tf = "tf" if twin_free else ""
                pre = f"pre{tf}_{m}_s{seed}"
                out.append(Job(pre, "jobs.pretrain", config, [f"train.seed={seed}", *(TWIN_FREE if twin_free else [])]))
                out.append(Job(f"zs100k{tf}_{m}_s{seed}", "jobs.evaluate", config, ML100K, pre))
                if not twin_free:
                    out.append(Job(f"zs_{m}_s{seed}", "jobs.evaluate", config, HELD_OUT, pre))
                    out.append(Job(f"ft_{m}_s{seed}", "jobs.finetune", config, [f"train.seed={seed}", *FINETUNE], pre))
    return out


def command_line(job: Job, exp: Path, extra: list[str]) -> list[str]:
    """The job's command line; its init_from is the checkpoint its pre-training run tested."""
    args = [f"run_dir={exp / job.run}", *job.overrides, f"model.text_cache={(exp / 'text_cache').resolve()}",
            "eval.keep_rows=true", "eval.groups=[unseen,new_user,new_item]", *extra]
    if job.init_from:
        metrics = json.loads((exp / job.init_from / "metrics.json").read_text())
        args.append(f"init_from={metrics['checkpoint']}")
    return [sys.executable, "-m", job.module, "--config", job.config, *args]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", type=Path, help="the experiment folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=[], help="run only these run folders")
    ap.add_argument("extra", nargs="*", help="overrides added to every job (key=value)")
    a = ap.parse_args(argv)
    a.exp.mkdir(parents=True, exist_ok=True)
    for job in jobs(a.seeds):
        if (a.exp / job.run / "metrics.json").exists() or (a.only and job.run not in a.only):
            continue
        cmd = command_line(job, a.exp, a.extra)
        print(f"[prerec_runs] {job.run}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(a.exp / f"{job.run}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"[prerec_runs] {job.run}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
