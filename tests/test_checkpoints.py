"""Verified checkpoints (xdtrain/train/checkpointing.py): a checkpoint counts only once its manifest,
written last, lists every file's size and sha256. Incomplete ones (a crash or a full disk mid-write)
are skipped by `latest_checkpoint` and resume, refused when a user names one, and pruned once a newer
one is complete. A real full disk (a small tmpfs, when this runs as root) leaves the previous
checkpoint loadable. Fast, no Ray."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import finetune, pretrain
from xdtrain.data.schemas import DataError
from xdtrain.outputs import DiskFullError, claim_output_dir, disk_full
from xdtrain.ps.local import LocalPS
from xdtrain.ps.table import TableSpec
from xdtrain.train import checkpointing as ck


def write_checkpoint(storage: Path, step: int, rows: int = 100, dim: int = 8) -> tuple[Path, LocalPS]:
    """A complete checkpoint as the engine writes one: dense + optimizer + state (rank 0), a cursor,
    every PS shard (here an in-process PS of `rows` rows), then the manifest."""
    d = storage / ck.checkpoint_name(step)
    ps = LocalPS(2)
    ps.create_table(TableSpec("item", dim))
    ps.pull("item", np.arange(rows, dtype=np.int64))  # admits the rows
    ps.checkpoint(ck.ps_url(d))
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    ck.save_rank0(d, ck.EngineState(step=step, samples=10 * step), model, opt)
    ck.save_cursor(d, 0, {"train": {"epoch": 0, "rows_emitted": step}})
    ck.write_manifest(d)
    return d, ps


def loads(d: Path) -> bool:
    """Everything a resume reads from `d` loads."""
    state = ck.open_checkpoint(d)
    model = torch.nn.Linear(4, 3)
    ck.load_dense(d, model)
    ck.load_optimizer(d, torch.optim.Adam(model.parameters()))
    ck.load_cursors(d, 1)
    ps = LocalPS(2)
    ps.restore(ck.ps_url(d))
    return state.step > 0 and ps.pull("item", np.arange(3, dtype=np.int64)).shape == (3, 8)


@pytest.fixture
def storage(tmp_path) -> Path:
    return claim_output_dir(tmp_path / "run", "run_dir") / "train"


def test_a_complete_checkpoint_verifies_and_loads(storage):
    d, _ = write_checkpoint(storage, 4)
    assert ck.verify(d) == "" and loads(d) and ck.latest_checkpoint(storage) == d
    manifest = (d / ck.MANIFEST_FILE).read_text()
    for rel in ("engine.json", "dense.safetensors", "optimizer.pt", "cursor-rank0.json", "ps/MANIFEST.json"):
        assert f'"{rel}"' in manifest


def zero_byte_engine_json(d: Path) -> str:
    (d / "engine.json").write_bytes(b"")
    return "engine.json has 0 bytes"


def truncated_optimizer(d: Path) -> str:
    data = (d / "optimizer.pt").read_bytes()
    (d / "optimizer.pt").write_bytes(data[: len(data) // 2])
    return "optimizer.pt has"


def flipped_byte_in_a_ps_shard(d: Path) -> str:
    shard = next(p for p in sorted((d / "ps").rglob("rows.npy")))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    return "rows.npy does not match its sha256"


def no_manifest(d: Path) -> str:
    (d / ck.MANIFEST_FILE).unlink()  # the writer stopped before the end
    return "no MANIFEST.json"


def lost_cursor(d: Path) -> str:
    (d / "cursor-rank0.json").unlink()
    return "cursor-rank0.json is missing"


@pytest.mark.parametrize("damage", [zero_byte_engine_json, truncated_optimizer, flipped_byte_in_a_ps_shard,
                                    no_manifest, lost_cursor], ids=lambda f: f.__name__)
def test_an_incomplete_checkpoint_is_skipped_and_resume_takes_the_previous(storage, damage):
    older, _ = write_checkpoint(storage, 2)
    newer, _ = write_checkpoint(storage, 4)
    why = damage(newer)
    assert why in ck.verify(newer)
    assert ck.latest_checkpoint(storage) == older
    assert ck.resume_point("", storage) == str(older) and loads(older)
    with pytest.raises(DataError, match=rf"{newer.name}: not a complete xdtrain checkpoint \(.*{why}"):
        ck.open_checkpoint(newer)


def test_resume_from_must_be_complete(tmp_path, storage):
    d, _ = write_checkpoint(storage, 2)
    assert ck.resume_point(str(d), tmp_path / "fresh") == str(d)
    assert ck.resume_point("", tmp_path / "fresh") == ""
    (d / "engine.json").write_bytes(b"")
    with pytest.raises(DataError, match="engine.json has 0 bytes"):
        ck.resume_point(str(d), tmp_path / "fresh")


@pytest.mark.parametrize("job, key", [(pretrain, "resume_from"), (finetune, "init_from")])
def test_jobs_refuse_an_incomplete_checkpoint_in_one_line(tmp_path, capsys, storage, job, key):
    d, _ = write_checkpoint(storage, 2)
    truncated_optimizer(d)
    assert job.main([f"run_dir={tmp_path / 'new'}", f"{key}={d}", "data.source=parquet",
                     f"data.interactions_url={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"DataError: {d}: not a complete xdtrain checkpoint (optimizer.pt has" in err


def test_prune_keeps_complete_checkpoints_and_removes_older_remains(storage):
    done = [write_checkpoint(storage, s)[0] for s in (2, 4, 8)]
    crashed, _ = write_checkpoint(storage, 6)
    (crashed / ck.MANIFEST_FILE).unlink()
    in_progress, _ = write_checkpoint(storage, 10)
    (in_progress / ck.MANIFEST_FILE).unlink()
    assert ck.prune(storage, keep=2, protect=set()) == [done[0].name, crashed.name]
    assert sorted(p.name for p in storage.glob("checkpoint_*")) == [done[1].name, done[2].name, in_progress.name]


def test_after_a_failed_fit_every_partial_checkpoint_is_discarded_and_others_are_kept(storage):
    done, _ = write_checkpoint(storage, 2)
    partials = [write_checkpoint(storage, s)[0] for s in (4, 6)]
    for p in partials:
        (p / ck.MANIFEST_FILE).unlink()
    mine = storage / "checkpoint_000000009_a000"  # named like the engine's, holding a user's file
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert ck.discard_incomplete(storage) == [p.name for p in partials]
    assert sorted(p.name for p in storage.glob("checkpoint_*")) == [done.name, mine.name]
    assert loads(done) and (mine / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (needs root; the test is skipped otherwise)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_loadable(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        storage = claim_output_dir(disk / "run", "run_dir") / "train"
        prev, _ = write_checkpoint(storage, 2)  # ~10 KB
        final = storage / ck.checkpoint_name(4)
        with pytest.raises(DiskFullError) as err:
            try:
                write_checkpoint(storage, 4, rows=20000, dim=32)  # ~2.5 MB of PS rows: does not fit
            except OSError as e:  # what the worker's checkpoint does with any error
                ck.raise_if_disk_full(e, final, discard=True)
                raise
        msg = str(err.value)
        assert msg == f"{final}: no space left on device while writing this checkpoint; " \
                      f"the previous checkpoint {prev} is intact"
        assert not final.exists()  # the partial checkpoint is gone: its space is free again
        assert ck.latest_checkpoint(storage) == prev and loads(prev)
        write_checkpoint(storage, 6)  # and the next checkpoint that fits is written
        assert ck.latest_checkpoint(storage).name == ck.checkpoint_name(6)


def test_a_full_disk_is_recognised_inside_ray_wrappers(tmp_path):
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    inner = OSError(28, "No space left on device", str(tmp_path / "x"))
    task = RayTaskError("write_checkpoint", "traceback", inner).as_instanceof_cause()
    worker = UserExceptionWithTraceback(DiskFullError(f"{tmp_path}/checkpoint_000000004_a000: no space"), "tb")
    group = WorkerGroupError("rank 0 failed", {0: worker})
    assert str(disk_full(group)) == f"{tmp_path}/checkpoint_000000004_a000: no space"
    assert str(disk_full(task)) == f"{tmp_path / 'x'}: no space left on device"  # the file, not Ray's traceback
    assert str(disk_full(OSError(28, "No space left on device"), "run")) == "run: no space left on device"
    assert disk_full(WorkerGroupError("other", {0: UserExceptionWithTraceback(KeyError("x"), "tb")})) is None
