"""The CLI and `python -m jobs.*` share one runner: same configs, same errors, metrics JSON written."""

from __future__ import annotations

import json
import subprocess
import sys

from xdtrain.cli import main


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
