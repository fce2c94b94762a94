"""The CLI and `python -m jobs.*` share one runner: same configs, same errors, metrics JSON written,
and a compact results table on the console."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from xdtrain.cli import main
from xdtrain.jobrunner import job_main, results_table
from xdtrain.outputs import claim_output_dir


def test_help_lists_jobs(capsys):
    assert main(["--help"]) == 0
    assert "gen-data" in capsys.readouterr().out


def test_unknown_job_is_exit_2(capsys):
    assert main(["no-such-job"]) == 2
    assert "unknown job 'no-such-job'" in capsys.readouterr().err


def test_bad_override_names_the_key(capsys):
    code = main(["gen-data", "--config", "configs/world_demo.yaml", "users.n_userz=5", "out=x"])
    assert code == 2
    assert "unknown key 'users.n_userz'" in capsys.readouterr().err


def test_gen_data_job_writes_world_and_metrics(tmp_path):
    out = tmp_path / "world"
    cmd = [sys.executable, "-m", "jobs.gen_data", "--config", "configs/world_demo.yaml", f"out={out}",
           "users.n_users=200"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    world = json.loads((out / "world.json").read_text())
    assert world["counts"]["n_users"] == 200
    assert any(out.joinpath("interactions").glob("*.parquet"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["job"] == "gen-data" and metrics["counts"]["n_interactions"] > 0
    assert f"n_interactions {metrics['counts']['n_interactions']}" in proc.stdout  # the results table
    assert '"config"' not in proc.stdout and f"metrics  {out / 'metrics.json'}" in proc.stdout


SUMMARY = {
    "run_dir": "/runs/r1", "steps": 384, "stop_reason": "epochs", "fit_seconds": 53.84, "best_step": 384,
    "test": {"seqrec": {"full": {"count": 3000, "hr@10": 0.904, "ndcg@10": 0.72649, "rank": 6.33}},
             "pop": {"full": {"count": 3000, "hr@10": 0.412, "ndcg@10": 0.2097, "rank": 26.525}}},
    "valid": {"full/ndcg@10": 0.6987},
    "validations": [{"step": 48, "full/ndcg@10": 0.5}],  # lists stay in metrics.json
    "ps_stats": {"wall_s": 58.2, "pull": {"calls": 7}},  # so do dicts of mixed shape
    "config": {"train": {"lr": 0.001}},
}


def test_results_table_is_compact_and_aligned():
    table = results_table(SUMMARY).splitlines()
    assert table[0] == "  steps 384  stop_reason epochs  fit_seconds 53.84  best_step 384"
    assert table[1:4] == [
        "  test         count   hr@10  ndcg@10   rank",
        "  seqrec full   3000  0.9040   0.7265   6.33",
        "  pop full      3000  0.4120   0.2097  26.52",
    ]
    assert table[4:] == ["  valid:  full/ndcg@10 0.6987", "  run_dir  /runs/r1"]


def test_job_prints_the_table_and_writes_the_whole_summary(tmp_path, capsys):
    run = claim_output_dir(tmp_path / "run", "run_dir")  # a job writes metrics.json only into its own folder
    summary = {**{k: v for k, v in SUMMARY.items() if k != "config"}, "run_dir": str(run)}
    assert job_main("toy", ToyConfig, lambda cfg: dict(summary), []) == 0
    out = capsys.readouterr().out
    tmp_path = run
    assert "xdtrain toy: done in" in out and "seqrec full   3000" in out and "validations" not in out
    assert f"metrics  {tmp_path / 'metrics.json'}" in out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["validations"] == SUMMARY["validations"] and written["config"] == {"n": 1}


@dataclass
class ToyConfig:
    n: int = 1
