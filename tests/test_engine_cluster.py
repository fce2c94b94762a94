"""The engine on a multi-node local cluster (cluster/): elasticity and `ray job submit`.

Each test starts its own head + worker nodes (separate raylets, `cluster.local.LocalCluster`) and
runs the driver in its own process, so the session's in-process Ray is not involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from enginekit import make_world, overrides, records, sequences_in, submit_and_wait

from cluster.local import LocalCluster, NodeSpec

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    return make_world(tmp_path_factory.mktemp("cluster") / "world")


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = log.read_text() if log is not None else ""
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def last_train(run_dir: Path) -> dict:
    train = [r for r in records(run_dir) if r["kind"] == "train"]
    return train[-1] if train else {}


def test_elastic_training_shrinks_and_grows_with_the_cluster(world, tmp_path):
    """2 trainer nodes -> one is killed mid-run -> training goes on with 1 worker from the last
    checkpoint -> a node is added -> back to 2 workers; every sequence is read once per epoch."""
    run_dir = tmp_path / "run"
    head = NodeSpec(num_cpus=1, ps=4)
    trainer = NodeSpec(num_cpus=1, trainer=1)
    with LocalCluster.start(f"/tmp/xdt-el-{os.getpid()}", head=head, workers=[trainer, trainer]) as cl:
        argv = overrides(world, run_dir, "train.epochs=40", "train.checkpoint_every=10", "train.eval_every=0",
                         "scale.workers=2", "scale.min_workers=1", "scale.trainer_resource=1",
                         "scale.resize_check_s=3", f"scale.address={cl.address}")
        # A lost node is declared dead after Ray's health checks; until then a 2-worker restart may
        # wait for it, so give up on that sooner than Ray's 60 s default.
        env = {**os.environ, **cl.client_env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
        env.pop("RAY_ADDRESS", None)
        # The driver's output goes to a file: a pipe nobody reads while the test waits would fill
        # up and block the driver.
        log = tmp_path / "driver.log"
        with log.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", "--config", "configs/demo.yaml", *argv],
                                    cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: last_train(run_dir).get("step", 0) >= 6, 240, "step 6 on 2 workers", proc, log)
            assert last_train(run_dir)["workers"] == 2
            cl.kill_node("worker-1")
            wait_until(lambda: last_train(run_dir).get("workers") == 1, 240, "a 1-worker record", proc, log)
            cl.add_node(trainer)
            wait_until(lambda: any(r["kind"] == "train" and r["workers"] == 2 and r["attempt"] >= 2
                                   for r in records(run_dir)), 300, "scale back up to 2 workers", proc, log)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, log.read_text()[-4000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["stop_reason"] == "epochs"
    assert summary["samples"] == 40 * sequences_in(run_dir)  # exactly once per epoch across resizes
    assert summary["attempts"] >= 3
    workers = [r["workers"] for r in records(run_dir) if r["kind"] == "train"]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2


def test_pretrain_job_submitted_with_job_submission_client(world, tmp_path):
    from ray.job_submission import JobStatus

    run_dir = tmp_path / "job"
    with LocalCluster.start(f"/tmp/xdt-job-{os.getpid()}", head=NodeSpec(num_cpus=2, ps=4, trainer=2)) as cl:
        status, logs = submit_and_wait(cl, ["-m", "jobs.pretrain", "--config", "configs/demo.yaml",
                                            *overrides(world, run_dir, "train.epochs=1", "scale.workers=2")])
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["job"] == "pretrain" and summary["steps"] > 0
    assert summary["test"]["seqrec"]["full"]["ndcg@10"] > summary["test"]["pop"]["full"]["ndcg@10"]
