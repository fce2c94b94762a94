"""Small helpers shared by the benchmarks: peak RSS, timing, phases in subprocesses, a ratio table.

Each benchmark measures a baseline and its candidates in the same run and prints ratios, so the
figures are comparable on a shared machine. Running each phase in its own process makes its peak
RSS (`ru_maxrss`) that phase's alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

RESULT_TAG = "BENCH_RESULT "  # the line a phase prints for its parent to pick up


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads together."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextmanager
def timer() -> Iterator[dict]:
    """`with timer() as t: ...` then `t["seconds"]` is the block's wall-clock time, `t["cpu_seconds"]`
    its CPU time (all threads). On a shared machine CPU time is the steadier of the two."""
    t: dict = {}
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - start
        t["cpu_seconds"] = cpu_seconds() - cpu


def report_result(result: dict) -> None:
    """Called by a phase process: print its result (peak RSS added) for `run_phase` to read."""
    print(RESULT_TAG + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)


def run_phase(argv: list[str], timeout: float | None = None) -> dict:
    """Run `python <argv>` in a fresh process and return the dict it passed to `report_result`."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"phase {argv} printed no result:\n{proc.stdout}\n{proc.stderr}")


def print_ratio_table(results: dict[str, dict], metric: str, baseline: str, unit: str = "") -> None:
    """One row per phase: the metric, its ratio to the baseline phase, and peak RSS when known."""
    base = results[baseline][metric]
    print(f"{'phase':<28} {metric + (' ' + unit if unit else ''):>20} {'ratio':>8} {'peak RSS MiB':>13}")
    for name, r in results.items():
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(f"{name:<28} {r[metric]:>20,.0f} {r[metric] / base:>8.3f} {rss:>13}")


def add_phase_args(p) -> None:
    """The hidden arguments a parent passes to an engine phase process (`run_engine`'s set-up)."""
    import argparse

    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="local", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)


def run_engine(config: str, overrides: list[str], workers: int, backend: str, shards: int) -> tuple[dict, list[dict]]:
    """Train `config` on an embedded Ray (log every iteration, no progress bar, no export) with
    `workers` Ray Train workers and a `backend` PS of `shards` shards: (the engine's summary,
    its per-iteration curve records)."""
    import tempfile
    from pathlib import Path

    import ray

    from xdtrain.config import load_config
    from xdtrain.train.config import EngineConfig
    from xdtrain.train.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        over = [f"run_dir={tmp}/run", *overrides, f"scale.workers={workers}", f"ps.backend={backend}",
                f"ps.shards={shards}", "train.log_every=1", "train.progress=false", "export_embeddings=false"]
        cfg = load_config(EngineConfig, config, over)
        ray.init(num_cpus=max(2, workers), resources={"ps": 8.0, "trainer": 4.0}, include_dashboard=False,
                 log_to_driver=False)
        summary = train(cfg)
        recs = [json.loads(x) for x in Path(tmp, "run", "curves.jsonl").read_text().splitlines()]
    return summary, recs

