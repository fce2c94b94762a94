"""Embedding refresh (issue 13): a checkpoint -> a validated, published version of user and item
vectors; checks that fail on planted bad inputs; a kill before the CURRENT flip; rollback; a reader
pinned to its version while the next one publishes. One small world and tiny SeqRec checkpoints
(in-process PS, a few hand-written steps) made once for the module; inference runs in-process
(workers=0, the same export hooks and writer) except in the Ray Data test, which is `slow`
(bench/refresh_bench.py runs the Ray Data path at scale and compares it with the in-process one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from enginekit import make_world, overrides, submit_and_wait

from xdtrain.cli import main as cli
from xdtrain.config import load_config
from xdtrain.models import build_model
from xdtrain.nn.program import OptimSpec
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.refresh import infer
from xdtrain.refresh.checks import ValidationFailed
from xdtrain.refresh.job import FAULT_ENV, run_refresh
from xdtrain.serving import EmbeddingReader, store
from xdtrain.train import checkpointing as ck
from xdtrain.train.config import RefreshConfig
from xdtrain.train.datasets import prepare_data
from xdtrain.train.optimizers import OptimizerSet

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(cfg: RefreshConfig, data, d: Path, seed: int = 0, steps: int = 3, nan: bool = False) -> Path:
    """A SeqRec trained `steps` steps on `data`, saved as the engine saves a checkpoint."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, data.model_data, seed)
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    opts = OptimizerSet(model, {"main": OptimSpec(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)})
    rows = pq.read_table(data.train_url).slice(0, 128)
    for s in range(steps):
        batch = model.make_batch(rows, np.random.default_rng(s))
        emb = pull_rows(ps, model.sparse_ids(batch))
        loss = model(batch, emb)
        opts.zero_grad()
        loss.backward()
        push_grads(ps, emb)
        opts["main"].opt.step()
    if nan:  # a diverged dense part: every user vector is NaN
        with torch.no_grad():
            next(model.backbone.parameters()).fill_(float("nan"))
    ck.save_rank0(d, ck.EngineState(step=steps), model, opts)
    ck.save_cursor(d, 0, {})
    ps.checkpoint(ck.ps_url(d))
    ck.write_manifest(d)
    return d


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh")
    world = make_world(root / "world")

    def args(out: Path, checkpoint: Path, *extra: str) -> list[str]:
        return overrides(world, root / "run", f"out={out}", f"checkpoint={checkpoint}", "workers=0",
                         f"refresh_dir={root / 'work'}", "rows_per_bucket=300", *extra)

    def config(out: Path, checkpoint: Path, *extra: str) -> RefreshConfig:
        return load_config(RefreshConfig, "configs/demo.yaml", args(out, checkpoint, *extra))

    base = config(root / "unused", root / "unused")
    data = prepare_data(base.data, root / "prep", min_groups=1)
    cks = {name: make_checkpoint(base, data, root / "cks" / name / ck.checkpoint_name(steps), seed, steps,
                                 nan=name == "nan")
           for name, seed, steps in (("v1", 0, 3), ("v2", 0, 4), ("drifted", 5, 3), ("nan", 0, 3))}
    first = root / "store-v1"
    run_refresh(config(first, cks["v1"]))
    return {"root": root, "args": args, "config": config, "cks": cks, "first": first}


def _new_store(kit, tmp_path) -> Path:
    """A store of its own (CURRENT changes in the test) with the first checkpoint's version published."""
    out = tmp_path / "store"
    run_refresh(kit["config"](out, kit["cks"]["v1"]))
    return out


def test_published_vectors_score_as_the_model(kit):
    out = kit["first"]
    version = store.read_current(str(out))
    info = store.read_version(str(out), version)
    assert {e["check"] for e in info["checks"]} >= {"keys", "rows", "finite", "norms", "canary"}
    canary = next(e for e in info["checks"] if e["check"] == "canary")
    assert canary["ok"] and canary["values"]["rows"] > 50
    assert abs(canary["values"]["published"] - canary["values"]["model"]) < 1e-6
    # the same dot products, one user at a time, from the reader and from the model
    cfg = kit["config"](out, kit["cks"]["v1"])
    data = prepare_data(cfg.data, kit["root"] / "work", min_groups=1)
    model = build_model(cfg.model, data.model_data, 0)
    ck.load_dense(kit["cks"]["v1"], model)
    ps = LocalPS.from_checkpoint(ck.ps_url(kit["cks"]["v1"]))
    rows = data.test.rows.slice(0, 20)
    reader = EmbeddingReader(str(out))
    users = reader.vectors(rows["user_id"].to_numpy(), "user")
    own = model.user_vectors([np.asarray(h) for h in rows["history"].to_pylist()], ps.pull).numpy()
    np.testing.assert_allclose(users, own, rtol=1e-5, atol=1e-6)
    dom = rows["domain"][0].as_py()
    items = data.model_data.item_domains[dom]
    np.testing.assert_allclose(reader.vectors(items, "item"), ps.pull("item", items).numpy(), rtol=1e-6)
    top, scores = reader.top_k(rows["user_id"].to_numpy()[:3], k=5, domain=dom)
    exact = users[:3] @ ps.pull("item", items).numpy().T
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :5], rtol=1e-5)
    assert set(top.reshape(-1)) <= set(items.tolist())
    streamed = EmbeddingReader(str(out), index_bytes=0, cache_buckets=1)  # no in-memory index: files each call
    np.testing.assert_array_equal(streamed.top_k(rows["user_id"].to_numpy()[:3], k=5, domain=dom)[0], top)
    with pytest.raises(KeyError, match="no vector for ids \\[-5\\]"):
        reader.vectors([int(items[0]), -5], "item")


@pytest.mark.parametrize("case,check", [("nan", "finite"), ("drifted", "drift"), ("missing_shard", "rows")])
def test_a_failed_check_leaves_current_and_names_the_check(kit, tmp_path, case, check):
    out = kit["first"]  # not changed: each case builds a version of its own name, never published
    before = store.read_current(str(out))
    extra = [f"version=bad-{case}"]
    ckpt = kit["cks"]["v2"]
    if case == "missing_shard":  # the user histories lose one of their two files
        users = tmp_path / "users"
        users.mkdir()
        rows = pq.read_table(kit["root"] / "work" / "users" / f"{before}.parquet")
        half = rows.num_rows // 2
        pq.write_table(rows.slice(0, half), users / "part-0.parquet")
        extra.append(f"users={users}")
    else:
        ckpt = kit["cks"][case]
    with pytest.raises(ValidationFailed, match=f"check '{check}' failed") as e:
        run_refresh(kit["config"](out, ckpt, *extra))
    assert "CURRENT is still " + before in str(e.value)
    assert store.read_current(str(out)) == before
    assert EmbeddingReader(str(out)).version == before


def test_an_interrupted_table_is_redone_and_a_kill_before_the_flip_keeps_the_old_version(kit, tmp_path,
                                                                                         monkeypatch):
    out = _new_store(kit, tmp_path)
    before = store.read_current(str(out))
    work = f"refresh_dir={tmp_path / 'work'}"
    real = infer.write_buckets

    def dies_in_user(batches, url, name, buckets):
        if name != "user":
            return real(batches, url, name, buckets)
        Path(url).mkdir(parents=True)  # what a kill mid-write leaves: a temporary part, no manifest
        (Path(url) / ".part-00000.parquet.tmp-1-x").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "write_buckets", dies_in_user)
    with pytest.raises(KeyboardInterrupt):
        run_refresh(kit["config"](out, kit["cks"]["v2"], work))
    monkeypatch.undo()
    (new,) = [v for v in store.version_names(str(out)) if v != before]
    assert store.read_version(str(out), new) is None and store.read_current(str(out)) == before
    # a real kill between writing the version and flipping CURRENT; the item table is kept, not redone
    args = ["--config", "configs/demo.yaml", *kit["args"](out, kit["cks"]["v2"], work)]
    env = {**os.environ, FAULT_ENV: "before_publish", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "jobs.refresh_embeddings", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "item: " in proc.stdout and "rows written before, kept" in proc.stdout
    assert store.read_version(str(out), new) is not None  # written whole, never flipped
    assert store.read_current(str(out)) == before and EmbeddingReader(str(out)).version == before
    summary = run_refresh(kit["config"](out, kit["cks"]["v2"], work))  # publishes the finished version as is
    assert summary["version"] == new and store.read_current(str(out)) == new
    assert not list((out / f"v={new}" / "user").glob(".*tmp*"))


def test_reader_keeps_its_version_while_the_next_publishes_and_rollback(kit, tmp_path, capsys):
    out = _new_store(kit, tmp_path)
    v1 = store.read_current(str(out))
    reader = EmbeddingReader(str(out))
    uid = np.asarray(pq.read_table(kit["root"] / "work" / "users" / f"{v1}.parquet")["user_id"])[:5]
    old = reader.vectors(uid, "user")
    v2 = run_refresh(kit["config"](out, kit["cks"]["v2"], "keep=1"))["version"]
    assert store.read_current(str(out)) == v2 and reader.version == v1
    reader._buckets.clear()  # reread from disk: v1's files are still there and still v1's
    np.testing.assert_array_equal(reader.vectors(uid, "user"), old)
    assert not np.allclose(EmbeddingReader(str(out)).vectors(uid, "user"), old)
    assert cli(["embeddings", "rollback", f"out={out}"]) == 0
    assert store.read_current(str(out)) == v1
    np.testing.assert_array_equal(EmbeddingReader(str(out)).vectors(uid, "user"), old)
    assert cli(["embeddings", "rollback", f"out={out}", f"version={v2}"]) == 0
    assert store.read_current(str(out)) == v2
    assert cli(["embeddings", "list", f"out={out}"]) == 0
    assert f"* {v2}" in capsys.readouterr().out


def _users_with_changed_histories(kit, path: Path, changed: int) -> tuple[Path, int]:
    """The first version's user input with the first `changed` histories (those longer than 1) cut
    short; returns the file and how many rows kept their history."""
    rows = pq.read_table(kit["root"] / "work" / "users" / f"{store.read_current(str(kit['first']))}.parquet")
    hist = rows["history"].to_pylist()
    cut = [h[:-1] if i < changed and len(h) > 1 else h for i, h in enumerate(hist)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.set_column(rows.column_names.index("history"), "history",
                                   pa.array(cut, rows.schema.field("history").type)), path)
    return path, sum(a == b for a, b in zip(hist, cut))


def test_canary_with_users_ranks_the_rows_whose_history_the_file_holds(kit, tmp_path):
    users, same = _users_with_changed_histories(kit, tmp_path / "u" / "part.parquet", changed=400)
    assert 100 < same < 700
    summary = run_refresh(kit["config"](tmp_path / "a", kit["cks"]["v1"], f"users={users}", "checks.canary_rows=1000"))
    (canary,) = [e for e in store.read_version(str(tmp_path / "a"), summary["version"])["checks"]
                 if e["check"] == "canary"]
    assert canary["ok"] and not canary.get("skipped") and canary["values"]["rows"] == same
    assert abs(canary["values"]["published"] - canary["values"]["model"]) < 1e-6
    # no held-out row's history in the file: the canary is skipped, and the report and summary say why
    users, same = _users_with_changed_histories(kit, tmp_path / "v" / "part.parquet", changed=10**9)
    summary = run_refresh(kit["config"](tmp_path / "b", kit["cks"]["v1"], f"users={users}"))
    assert summary["checks"]["canary/user"] == "skipped"
    (canary,) = [e for e in store.read_version(str(tmp_path / "b"), summary["version"])["checks"]
                 if e["check"] == "canary"]
    assert canary["skipped"] and f"has its user with the same history in users={users}" in canary["detail"]


def test_a_failed_version_is_listed_failed_and_pruned_once_a_later_one_publishes(kit, tmp_path, capsys):
    out = _new_store(kit, tmp_path)
    with pytest.raises(ValidationFailed):
        run_refresh(kit["config"](out, kit["cks"]["nan"], "version=bad"))
    stray = out / "v=stray"  # a failed-looking version xdtrain did not create: never deleted
    stray.mkdir()
    (stray / store.REPORT_FILE).write_text('{"checked_at": 0, "checks": [{"check": "rows", "table": "user", '
                                           '"ok": false, "detail": "planted"}]}')
    assert cli(["embeddings", "list", f"out={out}"]) == 0
    listed = capsys.readouterr().out
    assert "  bad  failed  check 'finite' failed on table 'user': " in listed
    assert store.prune(str(out), keep=3) == []  # checked after CURRENT was published: the latest word
    summary = run_refresh(kit["config"](out, kit["cks"]["v2"]))
    assert summary["removed"] == ["bad"] and not (out / "v=bad").exists() and stray.exists()


@pytest.mark.slow  # two Ray Data actor pools start (one per table): 30 s quiet, minutes on a loaded machine
@pytest.mark.ray
def test_ray_data_workers_write_the_same_vectors(kit, tmp_path, ray_cluster):
    out = tmp_path / "store"
    run_refresh(kit["config"](out, kit["cks"]["v1"], "workers=2", "batch_size=200", f"refresh_dir={tmp_path / 'w'}"))
    a, b = EmbeddingReader(str(kit["first"])), EmbeddingReader(str(out))
    assert a.version == b.version
    for table in ("item", "user"):
        assert a.info["tables"][table]["rows"] == b.info["tables"][table]["rows"]
    uid = np.asarray(pq.read_table(kit["root"] / "work" / "users" / f"{a.version}.parquet")["user_id"])
    np.testing.assert_allclose(a.vectors(uid, "user"), b.vectors(uid, "user"), rtol=1e-5, atol=1e-6)


def test_finetune_hands_workers_an_absolute_init_from(kit, monkeypatch):
    """A relative init_from/resume_from is the driver's: Ray Train workers run in another working
    directory, so `train` resolves it before anything is shipped to them (else they look for
    dense.safetensors under their own cwd). The run itself is stubbed: the path is what is tested here."""
    from xdtrain.train import engine

    ckpt = kit["cks"]["v1"]
    seen = {}
    monkeypatch.setattr(engine, "_train", lambda cfg, run_dir, log, faults: seen.update(cfg=cfg) or {})
    monkeypatch.chdir(ckpt.parent)
    cfg = load_config(engine.EngineConfig, str(REPO / "configs/demo.yaml"),
                      [f"run_dir={kit['root'] / 'ft'}", f"init_from={ckpt.name}", f"resume_from=./{ckpt.name}"])
    engine.run_finetune(cfg)
    assert seen["cfg"].init_from == seen["cfg"].resume_from == str(ckpt.resolve())
    monkeypatch.chdir(REPO)  # elsewhere, as a worker is: the path still names the checkpoint
    assert ck.open_checkpoint(seen["cfg"].init_from).step == 3


@pytest.mark.slow  # a local cluster starts and the job's Ray Data actor pools run on it: minutes when loaded
@pytest.mark.ray
def test_refresh_submitted_with_job_submission_client(kit, tmp_path):
    """`ray job submit` of the refresh to a local cluster (cluster/local.py) publishes the version
    the in-process refresh of the same checkpoint published, with the same vectors."""
    from ray.job_submission import JobStatus

    from cluster.local import LocalCluster, NodeSpec

    out = tmp_path / "store"
    with LocalCluster.start(f"/tmp/xdt-refresh-{os.getpid()}", head=NodeSpec(num_cpus=2)) as cl:
        status, logs = submit_and_wait(cl, ["-m", "jobs.refresh_embeddings", "--config", "configs/demo.yaml",
                                            *kit["args"](out, kit["cks"]["v1"], "workers=1", "batch_size=400",
                                                         f"refresh_dir={tmp_path / 'work'}")])
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    a, b = EmbeddingReader(str(kit["first"])), EmbeddingReader(str(out))
    assert a.version == b.version and f"published {b.version}" in logs
    uid = np.asarray(pq.read_table(kit["root"] / "work" / "users" / f"{a.version}.parquet")["user_id"])
    np.testing.assert_allclose(a.vectors(uid, "user"), b.vectors(uid, "user"), rtol=1e-5, atol=1e-6)
