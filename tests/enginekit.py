"""Shared pieces of the engine tests: a small generated world and engine configs over it."""

from __future__ import annotations

import json
from pathlib import Path

from xdtrain.config import load_config
from xdtrain.data.synthetic import WorldConfig, generate_world
from xdtrain.train.config import EngineConfig

SMALL = ["model.d=16", "model.max_len=20", "model.layers=1", "train.batch_size=64", "train.epochs=2",
         "train.log_every=1", "train.progress=false", "train.eval_every=1", "eval.candidates=[full]",
         # No wall budget: demo.yaml's 4 minutes once ended the elastic test's run on a slow CI machine
         # before the cluster grew back, so tests stop on epochs/steps only.
         "train.max_minutes=0"]


def make_world(out: Path) -> str:
    cfg = load_config(WorldConfig, "configs/world_demo.yaml",
                      ["users.n_users=800", "graph.n_entities=200", "graph.n_triplets=400", f"out={out}"])
    generate_world(cfg, str(out), progress=False)
    return str(out)


def overrides(world: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.world_url={world}", *SMALL, *extra]


def engine_config(world: str, run_dir: Path, *extra: str) -> EngineConfig:
    return load_config(EngineConfig, "configs/demo.yaml", overrides(world, run_dir, *extra))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "curves.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path) -> dict[int, float]:
    """Train loss by step (the last record of a step wins, as after a restart)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "train"}


def sequences_in(run_dir: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(run_dir / "data" / "train" / "part-00000.parquet").metadata.num_rows


def submit_and_wait(cluster, args: list[str], timeout: float = 400) -> tuple[object, str]:
    """`ray job submit` of `python <args>` to a cluster/local.py cluster; (final status, logs).

    The client needs only the auth mode (for the token header), never RAY_ADDRESS: with it set
    here, this process's own Ray (the session cluster) lost its GCS after that cluster shut down,
    and the next Ray Data / Ray Train call killed pytest 60 s later (reproduced, then fixed)."""
    import os
    import sys
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.runtime_env import job_runtime_env

    auth = {k: v for k, v in cluster.client_env().items() if k != "RAY_ADDRESS"}
    old = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    try:
        client = JobSubmissionClient(cluster.dashboard_url)
        job = client.submit_job(entrypoint=" ".join([sys.executable, *args]), runtime_env=job_runtime_env())
        ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        deadline = time.time() + timeout
        while (status := client.get_job_status(job)) not in ended:
            assert time.time() < deadline, f"timed out after {timeout}s waiting for job {job} to end"
            time.sleep(0.5)
        return status, client.get_job_logs(job)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
