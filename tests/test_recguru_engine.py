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


@pytest.mark.slow  # two full engine runs; the 2-worker program is covered above in the default suite
def test_one_worker_with_the_in_process_ps_matches_two_workers_with_a_ray_ps(ray_cluster, tmp_path):
    """Same config, data and fixed negatives on both set-ups: the test metrics (both domains' 1,200
    rows) agree within their noise, and both have learnt (far above a random ranking)."""
    write_world(["--out", str(tmp_path / "world"), "--users-a", "300", "--users-b", "900", "--overlap", "0.2"])
    runs = {}
    for name, scale in {"one": ["scale.workers=1", "ps.backend=local", "ps.shards=1"],
                        "two": ["scale.workers=2", "ps.backend=ray", "ps.shards=2"]}.items():
        cfg = load_config(EngineConfig, "configs/recguru_synthetic.yaml", [
            f"run_dir={tmp_path / name}", f"data.interactions_url={tmp_path / 'world' / 'interactions'}",
            "model.job=all", "model.d=16", "model.max_len=20", "model.ffn=32", "model.batch_size=64",
            "model.pretrain_steps=60", "model.adv_iterations=5", "train.epochs=6", "train.patience=0",
            "train.progress=false", "eval.candidates=[uniform:50]", "eval.baselines=[]",
            "export_embeddings=false", *scale])
        train(cfg)
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())["test"]["recguru"]["uniform:50"]
    one, two = runs["one"], runs["two"]
    print("1 worker + in-process PS:", one, "\n2 workers + 2-shard Ray PS:", two)
    assert one["count"] == two["count"] == 1200
    random_hr10 = 10 / 51
    for m in ("hr@10", "ndcg@10"):
        assert abs(one[m] - two[m]) <= 0.1, (m, one[m], two[m])
    assert min(one["hr@10"], two["hr@10"]) > random_hr10 + 0.15, (one, two, random_hr10)
