"""The distributed engine on a small synthetic world: training, PS backends, resume, failures.

All runs share the session's local Ray (tests/conftest.py) and one generated world.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from enginekit import curve, engine_config, make_world, overrides, records, sequences_in
from test_checkpoints import small_tmpfs

from jobs import pretrain
from xdtrain.config import ConfigError
from xdtrain.outputs import pid_alive
from xdtrain.ps import read_export
from xdtrain.ps.shm import SHM_DIR
from xdtrain.train import checkpointing as ck
from xdtrain.train.engine import run_evaluate, train

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    return make_world(tmp_path_factory.mktemp("engine") / "world")


def test_two_workers_two_shards_learn_and_beat_popularity(ray_cluster, world, tmp_path):
    cfg = engine_config(world, tmp_path / "run", "train.epochs=3")
    s = train(cfg)
    full = s["test"]["seqrec"]["full"]
    assert full["ndcg@10"] > 1.5 * s["test"]["pop"]["full"]["ndcg@10"]
    assert s["stop_reason"] == "epochs" and s["epochs"] == 3
    # every training sequence consumed exactly once per epoch, over both workers
    assert s["samples"] == 3 * sequences_in(tmp_path / "run")
    best = Path(s["checkpoint"])
    assert {f"cursor-rank{r}.json" for r in (0, 1)} <= {p.name for p in best.iterdir()}
    assert (best / "ps" / "_MANIFEST.json").exists() or any((best / "ps").iterdir())
    table = read_export(s["embeddings"]["item"])
    ids = table["id"].to_numpy()
    assert len(np.unique(ids)) == len(ids) == s["data"]["items"]
    assert len(table["vector"][0]) == 16
    losses = curve(tmp_path / "run")
    steps = sorted(losses)
    assert losses[steps[-1]] < losses[steps[0]]
    valid = [json.loads(x) for x in (tmp_path / "run" / "curves.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "valid"]
    assert len(valid) == 3 and all("full/ndcg@10" in v for v in valid)


@pytest.mark.slow  # the backends' rows are compared in test_ps_ray.py; this is the end-to-end check (~40 s)
def test_in_process_ps_matches_ray_ps_on_one_worker(ray_cluster, world, tmp_path):
    a = train(engine_config(world, tmp_path / "local", "scale.workers=1", "ps.backend=local", "train.epochs=1"))
    b = train(engine_config(world, tmp_path / "ray", "scale.workers=1", "ps.backend=ray", "train.epochs=1"))
    ca, cb = curve(tmp_path / "local"), curve(tmp_path / "ray")
    assert ca.keys() == cb.keys()
    np.testing.assert_allclose([ca[k] for k in sorted(ca)], [cb[k] for k in sorted(cb)], rtol=1e-5)
    assert a["test"]["seqrec"]["full"]["ndcg@10"] == pytest.approx(b["test"]["seqrec"]["full"]["ndcg@10"],
                                                                   abs=1e-4)


@pytest.mark.slow  # mid-phase resume to the same curve stays in the default suite (test_programs_engine.py)
def test_interrupted_run_resumes_to_the_same_curve(ray_cluster, world, tmp_path):
    """Stop after 7 steps (mid-epoch), start again on the same run_dir: the loss curve and the data
    consumed match an uninterrupted run."""
    # a checkpoint every 2 steps, 2 kept: the resumed run starts on a run_dir with pruned checkpoints
    common = ("scale.workers=1", "ps.backend=ray", "train.eval_every=0", "train.checkpoint_every=2")
    full = train(engine_config(world, tmp_path / "full", *common))
    cut = engine_config(world, tmp_path / "cut", *common, "train.max_steps=7")
    first = train(cut)
    assert first["steps"] == 7 and first["stop_reason"] == "max_steps"
    snapshot = json.loads((tmp_path / "cut" / "train" / ck.RAY_SNAPSHOT).read_text())
    assert len(snapshot["checkpoint_results"]) > len(list((tmp_path / "cut" / "train").glob("checkpoint_*")))
    resumed = train(engine_config(world, tmp_path / "cut", *common))
    assert resumed["steps"] == full["steps"] and resumed["samples"] == full["samples"]
    assert full["samples"] == 2 * sequences_in(tmp_path / "full")
    a, b = curve(tmp_path / "full"), curve(tmp_path / "cut")
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)


# logging every 3 steps, checkpoints every 5: a checkpoint still counts every sample before it
FAULTED = ("train.checkpoint_every=5", "train.epochs=2", "train.log_every=3")


@pytest.fixture(scope="module")
def clean(ray_cluster, world, tmp_path_factory) -> dict:
    """The uninterrupted run the fault tests compare with (one for all of them)."""
    return train(engine_config(world, tmp_path_factory.mktemp("clean") / "run", *FAULTED))


def test_killed_worker_is_recovered_from_checkpoint(ray_cluster, world, clean, tmp_path):
    hit = train(engine_config(world, tmp_path / "hit", *FAULTED), faults={"kill_worker_at_step": 8, "kill_rank": 1})
    assert [r["target"] for r in records(tmp_path / "hit") if r["kind"] == "fault"] == ["worker"]
    assert hit["attempts"] == 2 and clean["attempts"] == 1
    assert hit["samples"] == clean["samples"]  # nothing skipped or read twice across the restart
    assert hit["test"]["seqrec"]["full"]["ndcg@10"] == pytest.approx(
        clean["test"]["seqrec"]["full"]["ndcg@10"], abs=0.03)


def test_killed_ps_shard_is_recovered(ray_cluster, world, clean, tmp_path):
    hit = train(engine_config(world, tmp_path / "hit", *FAULTED), faults={"kill_ps_shard_at_step": 8, "shard": 1})
    killed = [r for r in records(tmp_path / "hit") if r["kind"] == "fault"]
    assert [(r["target"], r["step"]) for r in killed] == [("ps_shard", 8)]
    assert killed[0]["pid"] not in hit["ps_shard_pids"]  # the shard really died and was restarted
    assert hit["samples"] == clean["samples"]
    assert hit["test"]["seqrec"]["full"]["ndcg@10"] == pytest.approx(
        clean["test"]["seqrec"]["full"]["ndcg@10"], abs=0.03)


@pytest.mark.slow  # the default suite checks the same on PreRec (test_prerec_engine.py, 2 workers + Ray PS)
def test_evaluate_job_reproduces_the_test_metrics(ray_cluster, world, tmp_path):
    s = train(engine_config(world, tmp_path / "run", "scale.workers=1", "train.epochs=1"))
    ev = run_evaluate(engine_config(world, tmp_path / "eval", f"init_from={s['checkpoint']}"))
    assert ev["test"]["seqrec"]["full"]["ndcg@10"] == pytest.approx(s["test"]["seqrec"]["full"]["ndcg@10"],
                                                                    abs=1e-6)
    assert ck.load_state(s["checkpoint"]).step == ev["checkpoint_step"]


def test_bad_engine_configs_name_the_key(world, tmp_path):
    with pytest.raises(ConfigError, match="ps.backend 'local'"):
        train(engine_config(world, tmp_path / "x", "ps.backend=local", "scale.workers=2"))
    with pytest.raises(ConfigError, match="model.name"):
        train(engine_config(world, tmp_path / "y", "model.name=nope"))
    with pytest.raises(ConfigError, match="unknown key 'model.dd'"):
        train(engine_config(world, tmp_path / "z", "model.dd=3"))


def test_reconcile_ray_snapshot_forgets_pruned_checkpoints(tmp_path):
    names = [ck.checkpoint_name(s) for s in (2, 4, 6)]
    for n in names[1:]:
        (tmp_path / n).mkdir()
    entry = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"step": i}} for i, n in enumerate(names)]
    snap = {"checkpoint_results": entry, "checkpoint_report_indices": [0, 1, 2],
            "latest_checkpoint_result": entry[2], "validated_checkpoint_dir_names": names}
    (tmp_path / ck.RAY_SNAPSHOT).write_text(json.dumps(snap))
    assert ck.reconcile_ray_snapshot(tmp_path) == [names[0]]
    got = json.loads((tmp_path / ck.RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in got["checkpoint_results"]] == names[1:]
    assert got["checkpoint_report_indices"] == [1, 2] and got["latest_checkpoint_result"] == entry[2]
    assert got["validated_checkpoint_dir_names"] == names[1:]
    assert ck.reconcile_ray_snapshot(tmp_path) == []  # consistent now: left as it is



def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(ray_cluster, world, tmp_path, capsys):
    """run_dir on a tmpfs: a first run stops at step 3 with a checkpoint; the disk is then shrunk to
    hold half a checkpoint more, so the resumed run's next checkpoint (and its retry's) hits ENOSPC."""
    t0 = time.time()
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        args = ["--config", "configs/demo.yaml",
                *overrides(world, disk / "run", "scale.workers=2", "train.epochs=1", "train.max_failures=1",
                           "model.d=64")]  # a checkpoint several times the size of the PS's initial state
        assert pretrain.main([*args, "train.max_steps=3"]) == 0
        storage = disk / "run" / "train"
        first = ck.latest_checkpoint(storage)
        assert first is not None and ck.load_state(first).step == 3
        size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
        st = os.statvfs(disk)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(disk)], check=True)
        capsys.readouterr()
        assert pretrain.main(args) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        line = next(x for x in err.splitlines() if x.startswith("xdtrain pretrain: disk full: "))
        assert re.match(rf"xdtrain pretrain: disk full: {re.escape(str(storage))}/checkpoint_\d+_a\d+: "
                        r"no space left on device while writing this checkpoint; "
                        rf"the previous checkpoint {re.escape(str(first))} is intact$", line), line
        assert ck.latest_checkpoint(storage) == first and ck.open_checkpoint(first).step == 3
        assert [p.name for p in storage.glob("checkpoint_*") if p.is_dir()] == [first.name]  # partial ones are gone
    left = [p for p in Path(SHM_DIR).glob("xdps-*") if not pid_alive(int(p.name.split("-")[1]))]
    # The failed workers' shared-memory buffers (payloads of d=64 rows go through /dev/shm) were reclaimed;
    # files of processes outside this test that died meanwhile are not counted.
    assert [p for p in left if p.stat().st_ctime >= t0] == []
