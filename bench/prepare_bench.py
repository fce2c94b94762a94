"""Billion-row logs through the engine: preparation on Ray Data, then training, with every process's peak RSS.

    python -m bench.prepare_bench [--scales 1e7 1e8] [--steps 300] [--json out.json]

For each scale a synthetic world is generated once with `xdtrain gen-data` (configs/world_1e8.yaml;
1e7 = a tenth of its users and graph; cached under data/bench/world_<scale>). Then the demo's job
(`python -m jobs.pretrain --config configs/demo.yaml`: SASRec d 48, 2 Ray Train workers + a 2-shard
Ray PS, embedded Ray) runs on it end to end in its own process:
  ray     data.prepare=ray: the Ray Data recipe (xdtrain/data/distributed.py), then training
  memory  data.prepare=memory at the smallest scale: the in-memory recipe, the baseline of the ratios
Training runs `--steps` steps of the epoch (0 = the whole epoch: ~6.5M sequences at 1e8), no
validation; the test report ranks a seeded 0.05% of the users (data.eval_user_fraction) on the full
catalogue. Reported: preparation seconds (the engine's `prepare_seconds`), training samples/s (the
median of the engine's per-iteration records, the first dropped), and the peak RSS of the driver,
of each Ray Train worker, of each PS shard and of the Ray Data tasks, sampled every 0.5 s from
/proc over the job's process tree (the raylet's workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SCALES = {"1e7": {"users.n_users": 650_000, "graph.n_entities": 170_000, "graph.n_triplets": 1_000_000},
          "1e8": {}}


def world(scale: str) -> Path:
    out = ROOT / "data" / "bench" / f"world_{scale}"
    if not (out / "world.json").exists():
        over = [f"{k}={v}" for k, v in SCALES[scale].items()]
        print(f"[prepare_bench] generating the {scale} world into {out}", flush=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "xdtrain.cli", "gen-data", "--config", "configs/world_1e8.yaml",
                        f"out={out}", *over], cwd=ROOT, check=True)
        print(f"[prepare_bench] generated in {time.time() - t0:.0f} s", flush=True)
    return out


class TreeRSS:
    """Peak RSS per process of a process tree, by role (driver, train worker, PS shard, Ray Data task).
    A Ray worker process can serve tasks and later an actor, so each sample counts for the role the
    process has at that moment."""

    def __init__(self, root: int, every: float = 0.5):
        self.root, self.every = root, every
        self.peak: dict[tuple[int, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._tree():
                rss, role = _rss_and_role(pid)
                role = "driver" if pid == self.root else role
                if rss and role and role != "idle":
                    self.peak[(pid, role)] = max(self.peak.get((pid, role), 0), rss)
            self._stop.wait(self.every)

    def _tree(self) -> list[int]:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, todo = [], [self.root]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += [c for c, pp in parent.items() if pp == p]
        return tree

    def stop(self) -> dict[str, float]:
        """Peak RSS in MiB: the driver, and the maximum over the processes of each role."""
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for (_, role), kib in self.peak.items():
            out[role] = max(out.get(role, 0.0), kib / 1024)
        return {k: round(v) for k, v in out.items()}


def _rss_and_role(pid: int) -> tuple[int, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return 0, ""
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    role = ("train worker" if "RayTrainWorker" in cmd else "PS shard" if "Shard" in cmd
            else "Ray Data task" if cmd.startswith("ray::Map") or "ReadParquet" in cmd
            else "idle" if cmd.startswith("ray::IDLE") else "")
    return rss, role


def run_job(scale: str, path: str, steps: int, fraction: float, out: Path) -> dict:
    run_dir = out / f"{scale}_{path}_{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: curves.jsonl appends
    over = [f"run_dir={run_dir}", "overwrite=true", f"data.world_url={world(scale)}", f"data.prepare={path}",
            "data.reuse_prepared=false", f"data.eval_user_fraction={fraction}", "train.epochs=1",
            f"train.max_steps={steps}", "train.eval_every=0", "train.max_minutes=0", "train.log_every=5",
            "train.progress=false", "export_embeddings=false", "eval.baselines=[]"]
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", "--config", "configs/demo.yaml", *over],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = TreeRSS(proc.pid)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("[xdtrain] prepare") or "data:" in line[:20]:
            print("   ", line.rstrip()[:160], flush=True)
    proc.wait()
    peaks = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{scale} {path}: the job failed ({proc.returncode}):\n{''.join(log[-40:])}")
    stats = json.loads((run_dir / "data" / "prepared.json").read_text())["stats"]
    recs = [json.loads(x) for x in (run_dir / "curves.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]
    shutil.rmtree(run_dir)  # made by this run; the figures are taken
    return {"prepare_s": stats["prepare_seconds"], "interactions": stats["interactions"],
            "train_sequences": stats.get("train_sequences"), "partitions": stats.get("partitions", 1),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in train) if train else None,
            "steps": steps, "wall_s": round(time.time() - t0), "rss_mib": peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", default=["1e7", "1e8"], choices=list(SCALES),
                   help="the in-memory baseline runs at 1e7 (include it for the ratios)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (0 = one whole epoch)")
    p.add_argument("--paths", nargs="+", default=["memory", "ray"], choices=["memory", "ray"])
    p.add_argument("--eval-user-fraction", type=float, default=0.0005)
    p.add_argument("--out", default=str(ROOT / "runs" / "prepare_bench"))
    p.add_argument("--json", default="")
    args = p.parse_args()
    out = Path(args.out)
    results = {}
    print(f"prepare bench: scales {args.scales}, {args.steps} training steps; load {os.getloadavg()[0]:.2f}")
    for scale in args.scales:
        paths = ["memory", "ray"] if scale == "1e7" else ["ray"]  # 1e8 in memory: ~25 GB (the bench shows why)
        for path in [x for x in paths if x in args.paths]:
            key = f"{scale} {path}"
            print(f"[prepare_bench] {key}", flush=True)
            results[key] = run_job(scale, path, args.steps, args.eval_user_fraction, out)
            print(f"[prepare_bench] {key}: {json.dumps(results[key])}", flush=True)
    base = results.get("1e7 memory") or next(iter(results.values()))  # without it: ratios to the first run
    print(f"\n{'run':<12} {'interactions':>13} {'prepare s':>10} {'vs memory':>10} {'samples/s':>10} "
          f"{'vs memory':>10} {'driver MiB':>11} {'worker MiB':>11} {'PS MiB':>7} {'Data task MiB':>14}")
    for key, r in results.items():
        m = r["rss_mib"]
        sps = r["samples_per_s"] or 0.0
        print(f"{key:<12} {r['interactions']:>13,} {r['prepare_s']:>10.0f} {r['prepare_s'] / base['prepare_s']:>10.2f} "
              f"{sps:>10.0f} {sps / (base['samples_per_s'] or 1):>10.2f} {m.get('driver', 0):>11} "
              f"{m.get('train worker', 0):>11} {m.get('PS shard', 0):>7} {m.get('Ray Data task', 0):>14}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
