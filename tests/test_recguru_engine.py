"""RecGURU on the engine (spec sec. 9, test 16): the three phases on a tiny synthetic pair with
2 Ray Train workers and a 2-shard Ray PS, writing val/test HR/NDCG@{5,10,20} by domain."""

from __future__ import annotations

import json

import pytest

from xdtrain.config import load_config
from xdtrain.data.synthetic.two_domain import main as write_world
from xdtrain.train.config import EngineConfig
from xdtrain.train.engine import train

pytestmark = pytest.mark.ray


def test_three_phases_on_two_workers(ray_cluster, tmp_path):
    write_world(["--out", str(tmp_path / "world"), "--users-a", "120", "--users-b", "240", "--items-a", "60",
                 "--items-b", "100", "--overlap", "0.2"])
    cfg = load_config(EngineConfig, "configs/recguru_synthetic.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.interactions_url={tmp_path / 'world' / 'interactions'}",
        "model.job=all", "model.d=16", "model.max_len=20", "model.ffn=32", "model.batch_size=32",
        "model.pretrain_steps=6", "model.adv_iterations=2", "train.epochs=2", "train.patience=0",
        "train.progress=false", "eval.candidates=[uniform:30,popularity:20,full]", "eval.groups=[domain]",
        "eval.baselines=[pop]", "export_embeddings=false"])
    out = train(cfg)
    phases = [json.loads(line).get("phase") for line in (tmp_path / "run" / "curves.jsonl").read_text().splitlines()]
    assert {"pretrain", "adversarial", "finetune"} <= set(phases)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for mode in ("uniform:30", "popularity:20", "full"):
        for dom in ("domain=a", "domain=b"):
            got = metrics["test_groups"]["recguru"][mode][dom]
            assert {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)} <= set(got)
    assert out["valid"] and "uniform:30/hr@10" in out["valid"]
