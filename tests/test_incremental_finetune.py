"""Incremental fine-tuning (PreRec sec. 4.5, Fig. 3): `data.max_train_samples` keeps the first N
next-item samples of the train sequences (spec sec. 1.3: code `train_cut_list`, the first N samples
of the user-shuffled train split, whole sequences, the last one cut)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enginekit import engine_config, make_world

from xdtrain.config import load_config
from xdtrain.data.schemas import DataError
from xdtrain.data.sequences import first_samples
from xdtrain.train.config import EngineConfig
from xdtrain.train.datasets import prepare_data
from xdtrain.train.engine import run_finetune, train


def _samples(seqs: pa.Table) -> int:
    return sum(max(len(s) - 1, 0) for s in seqs["items"].to_pylist())


def _seqs() -> pa.Table:
    items = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]
    return pa.table({"user_id": pa.array([1, 2, 3, 4], pa.int64()),
                     "items": pa.array(items, pa.list_(pa.int64())),
                     "timestamps": pa.array([[10 * i for i in s] for s in items], pa.list_(pa.int64())),
                     "domains": pa.array([["a"] * len(s) for s in items], pa.list_(pa.string()))})


def test_first_samples_in_row_order_cuts_the_last_row_in_every_list_column():
    seqs = _seqs()
    out = first_samples(seqs, 4)
    assert out["items"].to_pylist() == [[1, 2, 3], [4, 5, 6]]
    assert out["timestamps"].to_pylist() == [[10, 20, 30], [40, 50, 60]]
    assert out["domains"].to_pylist() == [["a"] * 3, ["a"] * 3]
    assert out.schema == seqs.schema
    assert first_samples(seqs, 0).equals(seqs)  # 0 = every sample
    assert first_samples(seqs, 6).equals(seqs) and first_samples(seqs, 100).equals(seqs)


def test_first_samples_in_a_seeded_order_are_nested_and_keep_row_order():
    seqs = _seqs()
    full = dict(zip(seqs["user_id"].to_pylist(), seqs["items"].to_pylist()))
    prev: dict[int, list[int]] = {}
    for n in range(1, 7):
        out = first_samples(seqs, n, seed=2023)
        assert _samples(out) == n
        users = out["user_id"].to_pylist()
        assert users == sorted(users)
        got = dict(zip(users, out["items"].to_pylist()))
        assert all(full[u][: len(s)] == s for u, s in got.items())  # time-order prefixes
        assert all(len(got[u]) >= len(s) for u, s in prev.items())  # a larger N keeps what a smaller had
        prev = got
    with pytest.raises(DataError, match="n_samples: must be >= 0"):
        first_samples(seqs, -1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    return make_world(tmp_path_factory.mktemp("incremental") / "world")


def _data(world: str, run_dir: Path, *extra: str):
    cfg = load_config(EngineConfig, "configs/demo.yaml", [f"data.world_url={world}", *extra])
    return prepare_data(cfg.data, run_dir)


def test_prepare_data_keeps_exactly_the_first_n_samples(world, tmp_path):
    full = _data(world, tmp_path / "all")
    all_seqs = pq.read_table(full.train_url)
    by_user = dict(zip(all_seqs["user_id"].to_pylist(), all_seqs["items"].to_pylist()))
    assert full.stats["train_samples"] == _samples(all_seqs) > 1000
    prev: set[int] = set()
    for n in (1, 300, 1000):
        part = _data(world, tmp_path / f"n{n}", f"data.max_train_samples={n}")
        seqs = pq.read_table(part.train_url)
        assert _samples(seqs) == part.stats["train_samples"] == n
        users = seqs["user_id"].to_pylist()
        assert all(by_user[u][: len(s)] == s for u, s in zip(users, seqs["items"].to_pylist()))
        assert prev <= set(users)
        prev = set(users)
        # only training is cut: validation and test stay whole
        assert part.test.rows.num_rows == full.test.rows.num_rows
        assert part.valid.rows.num_rows == full.valid.rows.num_rows
    again = _data(world, tmp_path / "again", "data.max_train_samples=300")  # the same users every time
    assert pq.read_table(again.train_url).equals(pq.read_table(tmp_path / "n300" / "data" / "train"))


def test_negative_max_train_samples_names_the_key(world, tmp_path):
    with pytest.raises(DataError, match=r"data\.max_train_samples: must be >= 0.*got -5"):
        _data(world, tmp_path / "bad", "data.max_train_samples=-5")


@pytest.mark.ray
def test_a_tiny_run_consumes_exactly_n_samples_and_fine_tuning_can_keep_its_start(ray_cluster, world, tmp_path):
    """One epoch on one worker: every row of the cut train file is read once and, with max_len above
    the longest row, every one of its targets is trained: N next-item samples in all."""
    n = 400
    run = tmp_path / "run"
    s = train(engine_config(world, run, "scale.workers=1", "ps.backend=local", "train.epochs=1",
                            "model.max_len=200", f"data.max_train_samples={n}"))
    seqs = pq.read_table(run / "data" / "train")
    assert max(len(x) for x in seqs["items"].to_pylist()) <= 201
    assert _samples(seqs) == n
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["train_samples"] == n
    assert s["samples"] == metrics["samples"] == seqs.num_rows  # rows consumed, each once

    # Fine-tuning with train.eval_at_start: the starting model is validated (step 0) and checkpointed,
    # so early stopping picks among the starting model and every later validation.
    ft_dir = tmp_path / "ft"
    ft = run_finetune(engine_config(world, ft_dir, "scale.workers=1", "ps.backend=local", "train.epochs=3",
                                    "model.max_len=200", "train.eval_at_start=true", f"init_from={s['checkpoint']}",
                                    f"data.max_train_samples={n}"))
    first = ft["validations"][0]
    assert first["step"] == 0 and first["full/ndcg@10"] == pytest.approx(s["valid"]["full/ndcg@10"], abs=1e-6)
    assert len(ft["validations"]) == 4  # start + 3 epochs
    scores = {v["step"]: v["full/ndcg@10"] for v in ft["validations"]}
    assert ft["best_step"] == max(scores, key=scores.get)
