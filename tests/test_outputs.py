"""Outputs: atomic writes leave no partial file; xdtrain writes only into folders it owns and deletes
only what it created. One test per data-loss reproduction (issue 12): each refuses and leaves the
user's files intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.outputs import (
    MARKER,
    AtomicFile,
    OutputError,
    OutputExists,
    StagedDir,
    claim_output_dir,
    is_owned,
    owner_of,
    remove_owned,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]


def user_files(root: Path, *names: str) -> dict[Path, str]:
    """Create files of the user's under `root`; returns {path: content} to check they survive."""
    made = {}
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"the user's {name}")
        made[p] = p.read_text()
    return made


def intact(made: dict[Path, str]) -> bool:
    return all(p.exists() and p.read_text() == text for p, text in made.items())


def tiny_world_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(
        "progress: false\n"
        "domains:\n  - {name: books, n_items: 40, traffic: 2.0}\n  - {name: games, n_items: 30, traffic: 1.0}\n"
        "users: {n_users: 60, block_size: 64}\n"
        "graph: {n_entities: 50, n_triplets: 200, block_triplets: 200}\n"
    )
    return path


# ---------------------------------------------------------------- atomic writes


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_failing_midway_leaves_old_file_and_no_temporary(tmp_path, where):
    fs = fsspec.filesystem("memory") if where == "memory" else None
    root = f"/atomic-{os.getpid()}" if where == "memory" else str(tmp_path)
    listing = (lambda: fs.ls(root, detail=False)) if fs else (lambda: os.listdir(root))
    path = f"{root}/data.json"
    write_json_atomic(path, {"version": 1}, fs)
    with pytest.raises(Boom):
        with AtomicFile(path, fs) as f:
            f.write(b'{"version": 2, "half')
            raise Boom("the writer died midway")
    opener = fs.open if fs else open
    with opener(path, "rb") as f:
        assert json.loads(f.read()) == {"version": 1}
    assert [p.rstrip("/").rpartition("/")[2] for p in listing()] == ["data.json"]


def test_atomic_writers_replace_whole_files(tmp_path):
    p = tmp_path / "sub" / "f"
    write_bytes_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_text_atomic(p, "text")
    assert p.read_text() == "text"
    write_json_atomic(p, {"b": np.float32(0.5), "a": np.arange(2), "p": Path("/x")})
    assert json.loads(p.read_text()) == {"a": [0, 1], "b": 0.5, "p": "/x"}
    assert sorted(os.listdir(p.parent)) == ["f"]


def test_an_unwritable_file_gives_an_error_and_no_temporary(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "a_file" / "child", "y")  # the parent is a file
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# ---------------------------------------------------------------- ownership primitives


def test_claim_marks_new_and_empty_folders_and_refuses_a_full_one(tmp_path):
    new = claim_output_dir(tmp_path / "new", "run_dir")
    assert is_owned(new) and json.loads((new / MARKER).read_text())["path"] == str(new)
    (tmp_path / "empty").mkdir()
    assert is_owned(claim_output_dir(tmp_path / "empty", "run_dir"))
    made = user_files(tmp_path / "mine", "notes.txt")
    with pytest.raises(OutputError, match=r"mine.*not created by xdtrain.*overwrite=true"):
        claim_output_dir(tmp_path / "mine", "run_dir")
    assert intact(made) and not (tmp_path / "mine" / MARKER).exists()
    assert is_owned(claim_output_dir(tmp_path / "mine", "run_dir", overwrite=True)) and intact(made)


def test_a_copied_marker_does_not_make_a_folder_xdtrains(tmp_path):
    src = claim_output_dir(tmp_path / "run", "run_dir")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / MARKER).write_bytes((src / MARKER).read_bytes())
    (copy / "mine.txt").write_text("x")
    assert not is_owned(copy)
    with pytest.raises(OutputError):
        claim_output_dir(copy, "run_dir")


@pytest.mark.parametrize("which", ["/", "home", "repo", "parent of repo"])
def test_root_home_and_repository_are_never_outputs(which):
    path = {"/": Path("/"), "home": Path.home(), "repo": REPO, "parent of repo": REPO.parent}[which]
    with pytest.raises(OutputError, match="choose a folder of its own"):
        claim_output_dir(path, "run_dir", overwrite=True)
    with pytest.raises(OutputError):
        StagedDir(path, "out_dir")
    assert not (path / MARKER).exists()


def test_remove_owned_deletes_only_what_xdtrain_created(tmp_path):
    run = claim_output_dir(tmp_path / "run", "run_dir")
    ours = claim_output_dir(run / "ours", "sub")
    made = user_files(run, "theirs/a.txt", "file.txt")
    with pytest.raises(OutputError, match="did not create it"):
        remove_owned(run / "theirs", run)
    with pytest.raises(OutputError, match="did not create it"):
        remove_owned(run / "file.txt", run)
    remove_owned(run / "file.txt", run, created=lambda p: p.endswith("file.txt"))  # the caller's record
    assert not (run / "file.txt").exists()
    remove_owned(ours, run)
    assert not ours.exists() and (run / "theirs" / "a.txt").read_text() == made[run / "theirs" / "a.txt"]
    stray = claim_output_dir(tmp_path / "stray", "x")  # owned, but not inside the root given
    with pytest.raises(OutputError, match="not inside"):
        remove_owned(stray, run)
    unowned = tmp_path / "plain"
    (unowned / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match="not in a folder xdtrain created"):
        remove_owned(unowned / "sub", unowned, created=lambda p: True)
    assert (unowned / "sub").is_dir() and stray.is_dir()
    link = run / "link"
    link.symlink_to(tmp_path / "plain")  # resolves outside the root: never followed into a deletion
    with pytest.raises(OutputError, match="not inside"):
        remove_owned(link, run, created=lambda p: True)
    assert (unowned / "sub").is_dir()


def test_staged_dir_keeps_the_old_version_on_failure(tmp_path):
    out = tmp_path / "out"
    with StagedDir(out, "out") as stage:
        (Path(stage.path) / "t.txt").write_text("v1")
    assert is_owned(out) and (out / "t.txt").read_text() == "v1"
    with pytest.raises(Boom):
        with StagedDir(out, "out") as stage:
            (Path(stage.path) / "t.txt").write_text("half")
            raise Boom("crash mid-write")
    assert (out / "t.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OutputExists, match="already exists"):
        StagedDir(out, "out", replace=False)


def test_staged_dir_cleans_only_its_own_dead_stages(tmp_path):
    out = tmp_path / "world"
    dead = StagedDir(out, "out")
    rec = json.loads(Path(dead.path, MARKER).read_text())
    rec["pid"] = 2**22 + 12345  # beyond pid_max: a process that is gone
    Path(dead.path, MARKER).write_text(json.dumps(rec))
    made = user_files(tmp_path, ".world.tmp-mine/keep.txt")  # the same prefix, not xdtrain's
    with StagedDir(out, "out") as stage:
        (Path(stage.path) / "x").write_text("x")
    assert not Path(dead.path).exists() and intact(made)


# ---------------------------------------------------------------- the reproductions of issue 12


def test_prepare_movielens_never_deletes_a_folder_it_did_not_create(tmp_path, capsys):
    from jobs.prepare_movielens import main

    victim = tmp_path / "home-like"
    made = user_files(victim, ".ssh/id_ed25519", "thesis.tex")
    args = ["dataset=ml-100k", "sequences=none", "k_core=0"]
    assert main([*args, f"out_dir={victim}"]) == 2
    assert "not created by xdtrain" in capsys.readouterr().err
    assert intact(made) and sorted(p.name for p in victim.iterdir()) == [".ssh", "thesis.tex"]
    out = tmp_path / "ml"
    assert main([*args, f"out_dir={out}"]) == 0
    assert main([*args, f"out_dir={out}", "min_rating=4"]) == 0  # republishing its own output is fine
    assert json.loads((out / "metrics.json").read_text())["config"]["min_rating"] == 4
    assert is_owned(out) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pretrain_world_regeneration_keeps_user_files(tmp_path):
    from xdtrain.train.config import DataConfig
    from xdtrain.train.datasets import load_interactions

    run = claim_output_dir(tmp_path / "run", "run_dir")
    made = user_files(run, "world/notes.txt", "world.partial/draft.txt")
    cfg = DataConfig(source="synthetic", world_config=str(tiny_world_yaml(tmp_path)))
    with pytest.raises(OutputError, match="world.*not created by xdtrain"):
        load_interactions(cfg, run)
    assert intact(made)
    notes = run / "world" / "notes.txt"
    notes.unlink()
    notes.parent.rmdir()
    del made[notes]
    inter = load_interactions(cfg, run).table  # generated into run/world; world.partial is not its own
    assert inter.num_rows > 0 and is_owned(run / "world") and intact(made)


def _engine_checkpoint(root: Path, step: int) -> Path:
    from xdtrain.train.checkpointing import write_manifest

    d = root / f"checkpoint_{step:09d}_a000"
    user_files(d, "engine.json", "dense.safetensors", "optimizer.pt", "cursor-rank0.json", "ps/MANIFEST.json")
    write_manifest(d)
    return d


def test_prune_deletes_only_engine_checkpoints(tmp_path):
    from xdtrain.train.checkpointing import prune

    run = claim_output_dir(tmp_path / "run", "run_dir")
    train = run / "train"
    ours = [_engine_checkpoint(train, s) for s in (2, 4, 6, 8)]
    made = user_files(train, "checkpoint_mine/model.pt", "checkpoint_foo")
    copy = _engine_checkpoint(train, 1)
    made |= user_files(copy, "my-notes.txt")  # engine-named, but holds a file of the user's
    assert prune(train, keep=1, protect={ours[1].name}) == [ours[0].name, ours[2].name]
    assert [p.exists() for p in ours] == [False, True, False, True]
    assert intact(made) and copy.is_dir()
    plain = tmp_path / "plain"  # a run folder xdtrain did not create: nothing is deleted
    c = _engine_checkpoint(plain / "train", 1)
    _engine_checkpoint(plain / "train", 2)
    with pytest.raises(OutputError):
        prune(plain / "train", keep=1, protect=set())
    assert c.is_dir()


def test_pretrain_refuses_a_run_dir_it_did_not_create(tmp_path, capsys):
    from jobs.pretrain import main

    run = tmp_path / "mine"
    made = user_files(run, "data/train/part-00000.parquet", "metrics.json")
    assert main([f"run_dir={run}"]) == 2
    assert "not created by xdtrain" in capsys.readouterr().err
    assert intact(made) and sorted(p.name for p in run.iterdir()) == ["data", "metrics.json"]


@pytest.mark.parametrize("which", ["/", "home", "repo"])
def test_pretrain_refuses_root_home_and_repository(which, capsys):
    from jobs.pretrain import main

    path = {"/": Path("/"), "home": Path.home(), "repo": REPO}[which]
    before = {n: (path / n).exists() for n in ("data", "train", "metrics.json", "world", MARKER)}
    assert main([f"run_dir={path}", "overwrite=true"]) == 2
    assert "choose a folder of its own" in capsys.readouterr().err
    assert {n: (path / n).exists() for n in before} == before


def test_gen_data_keeps_a_partial_folder_it_did_not_create(tmp_path, capsys):
    from jobs.gen_data import main

    cfg = tiny_world_yaml(tmp_path)
    out = tmp_path / "w"
    made = user_files(tmp_path, "w.partial/precious.txt")
    assert main(["--config", str(cfg), f"out={out}"]) == 0
    assert intact(made) and is_owned(out) and (out / "world.json").exists()
    mine = tmp_path / "mine"
    made |= user_files(mine, "a.txt")
    assert main(["--config", str(cfg), f"out={mine}", "output.overwrite=true"]) == 2
    assert "not created by xdtrain" in capsys.readouterr().err
    assert intact(made) and not (mine / "world.json").exists()


def test_text_cache_compaction_keeps_files_it_did_not_write(tmp_path):
    from xdtrain.text.cache import TextCache, compact_cache, item_keys

    items = pa.table({"domain": ["a", "a"], "item_id": pa.array([1, 2], pa.int64()), "text": ["t", "u"]})
    keys = item_keys(items).select(["domain", "item_id", "text_hash"])
    rows = keys.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 2))
    cache = TextCache(str(tmp_path / "cache"))
    cache.write_part(rows)
    cache.write_part(rows)
    root = Path(cache.root)
    assert is_owned(root)
    pq.write_table(rows, root / "part-mine.parquet")  # not a name the cache writes
    compact_cache(str(tmp_path / "cache"), items)
    assert len(cache.parts()) == 1 and (root / "part-mine.parquet").exists()
    (root / MARKER).unlink()  # a cache folder xdtrain did not create: compaction deletes nothing
    with pytest.raises(OutputError):
        compact_cache(str(tmp_path / "cache"), items)
    assert (root / "part-mine.parquet").exists() and len(cache.parts()) >= 1


def test_ps_checkpoint_cleanup_keeps_folders_it_did_not_write(tmp_path):
    from xdtrain.ps import LocalPS, TableSpec

    ps = LocalPS(1)
    ps.create_table(TableSpec("t", 4))
    ck = tmp_path / "ck"
    ps.checkpoint(str(ck))
    made = user_files(ck, "data-mine/x.npy", "data-20240101-000000-deadbeef/notes.txt")
    ps.checkpoint(str(ck))
    assert intact(made) and len([p for p in ck.glob("data-2*") if p.name != "data-20240101-000000-deadbeef"]) == 1
    full = tmp_path / "full"
    made |= user_files(full, "a.txt")
    with pytest.raises(OutputError):
        ps.checkpoint(str(full))
    assert intact(made) and sorted(p.name for p in full.iterdir()) == ["a.txt"]


def test_graph_save_never_replaces_a_folder_it_did_not_create(tmp_path):
    from graph import save_graph
    from graph.build import GraphBuildConfig, build_graph

    trip = tmp_path / "t.parquet"
    pq.write_table(pa.table({"head": pa.array([1, 2], pa.int64()), "relation": pa.array([0, 0], pa.int32()),
                             "tail": pa.array([2, 3], pa.int64())}), trip)
    g = build_graph(GraphBuildConfig(triplets=str(trip), out="unused", progress=False))
    made = user_files(tmp_path / "g", "mine.txt")
    with pytest.raises(OutputError, match="not created by xdtrain"):
        save_graph(g, str(tmp_path / "g"), overwrite=True)
    assert intact(made)
    save_graph(g, str(tmp_path / "g2"))
    save_graph(g, str(tmp_path / "g2"), overwrite=True)  # its own earlier graph: replaced
    assert owner_of(tmp_path / "g2") == str(tmp_path / "g2")


def test_local_cluster_removes_only_its_own_folders(tmp_path):
    import tempfile

    from cluster.local import ClusterError, LocalCluster

    root = Path(tempfile.mkdtemp(prefix="xdo-")) / "c"  # short: the cluster refuses long roots first
    made = user_files(root, "logs/mine.log")
    with pytest.raises(ClusterError, match="not created by xdtrain"):
        LocalCluster.start(root)  # refused before any node starts
    assert intact(made)
    claim_output_dir(root, "cluster root", overwrite=True)
    ray_dir = claim_output_dir(root / "ray", "cluster ray folder")
    user_files(ray_dir, "session_x/log.txt")
    LocalCluster(root, {"nodes": {}})._remove_files()  # the user's logs/ is not the cluster's
    assert not ray_dir.exists() and intact(made) and is_owned(root)
    (root / "logs" / "mine.log").unlink()
    (root / "logs").rmdir()
    LocalCluster(root, {"nodes": {}})._remove_files()
    assert not root.exists()  # nothing of anyone else's left: the root goes too
    root.parent.rmdir()
