"""AMID on the engine: configs/amid_released.yaml on the released-format fixture, 2 Ray Train
workers + a 2-shard Ray PS, Alg. 1's O-pass / D-pass rounds."""

from __future__ import annotations

import json

import pytest
from amidkit import FIXTURE
from enginekit import records

from xdtrain.config import load_config
from xdtrain.train.config import EngineConfig
from xdtrain.train.engine import train

pytestmark = pytest.mark.ray

SMALL = ["model.d=16", "model.max_len=8", "model.layers=1", "model.heads=2", "train.batch_size=64",
         "train.epochs=2", "train.log_every=1", "train.progress=false", "eval.candidates=[uniform:20]",
         "export_embeddings=false", "train.max_minutes=0"]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("amid") / "run"
    cfg = load_config(EngineConfig, "configs/amid_released.yaml",
                      [f"run_dir={run}", f"data.released_dir={FIXTURE}", *SMALL])
    return run, train(cfg)


def test_amid_runs_both_stages_on_two_workers_and_reports_by_overlap(two_worker_run):
    run, summary = two_worker_run
    recs = [r for r in records(run) if r["kind"] == "train"]
    losses = set().union(*(r.get("losses", {}) for r in recs))
    assert {"pred", "imputation", "propensity", "debias"} <= losses  # stage 1 on O (+P) and stage 2 on D
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]["amid"]["uniform:20"]
    assert 0 <= test["ndcg@10"] <= 1 and test["count"] == summary["data"]["test_rows"]
    groups = metrics["test_groups"]["amid"]["uniform:20"]
    assert groups["overlap=true"]["count"] == summary["data"]["test_overlap_rows"]
    assert groups["overlap=true"]["count"] + groups["overlap=false"]["count"] == test["count"]
    assert len(metrics["validations"]) == 2  # one per phase epoch (an O-pass then a D-pass)


@pytest.mark.slow  # the 2-worker test above covers the program in the default suite (make test < 20 min)
def test_the_same_config_runs_on_one_worker_with_the_in_process_ps_with_matching_metrics(two_worker_run, tmp_path):
    """Same config, same data and fixed negatives: the test metrics agree within the noise of ~60 test
    rows (the MIM groups differ: a worker's share of the global batch)."""
    run2, summary2 = two_worker_run
    run1 = tmp_path / "amid1"
    cfg = load_config(EngineConfig, "configs/amid_released.yaml",
                      [f"run_dir={run1}", f"data.released_dir={FIXTURE}", *SMALL, "scale.workers=1",
                       "ps.backend=local"])
    summary1 = train(cfg)
    one, two = (json.loads((r / "metrics.json").read_text())["test"]["amid"]["uniform:20"] for r in (run1, run2))
    assert one["count"] == two["count"] == summary1["data"]["test_rows"] == summary2["data"]["test_rows"]
    assert len(summary1["validations"]) == len(summary2["validations"]) == 2
    for m in ("hr@10", "ndcg@10"):
        assert abs(one[m] - two[m]) <= 0.15, (m, one[m], two[m])
