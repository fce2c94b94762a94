"""PreRec on the distributed engine (configs/prerec_demo.yaml) on a small generated 3-domain world.

Pre-training runs on books + movies only; games is held out. The default suite pre-trains PreRec and
PreRec_n on 2 workers with a 2-shard Ray PS, scores them zero-shot and fine-tunes PreRec (the pipeline
of docs/results/prerec.md, in about a minute). The slow tests add 1-worker runs (Ray PS and the
in-process PS) and compare them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import pytest
from enginekit import curve, make_world

from xdtrain.config import load_config
from xdtrain.train.checkpointing import load_state
from xdtrain.train.config import EngineConfig, check_ranges
from xdtrain.train.engine import run_evaluate, train

SMALL = ["model.d=16", "model.max_len=20", "model.negatives=32", "train.epochs=2", "train.lr=0.005",
         "train.eval_every=2", "train.log_every=1", "train.progress=false", "eval.baselines=[pop,random]"]
TWO = ["scale.workers=2", "ps.backend=ray", "ps.shards=2"]
PREREC_N = ["model.use_domain=false", "model.use_popularity=false", "model.use_offsets=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[str, str]:
    """(world URL, a text cache shared by every run of this module: MiniLM encodes each title once)."""
    base = tmp_path_factory.mktemp("prerec_engine")
    return make_world(base / "world"), str(base / "text_cache")


def config(world: tuple[str, str], run_dir: Path, *extra: str) -> EngineConfig:
    url, cache = world
    return load_config(EngineConfig, "configs/prerec_demo.yaml",
                       [f"run_dir={run_dir}", f"data.world_url={url}", f"model.text_cache={cache}", *SMALL, *extra])


class Pipeline(NamedTuple):
    exp: Path  # laid out as scripts/prerec_runs.py lays out its experiment (settings pre, zs, ft; seed 0)
    pre: dict[str, dict]  # model -> the pre-training run's metrics
    zs: dict[str, dict]
    ft: dict[str, dict]


@pytest.fixture(scope="module")
def pipeline(ray_cluster, world, tmp_path_factory) -> Pipeline:
    """PreRec and PreRec_n pre-trained on books + movies (2 workers + a 2-shard Ray PS), scored
    zero-shot on games and fine-tuned on it, with the per-row metrics the results tables pair."""
    exp = tmp_path_factory.mktemp("prerec_exp")
    rows = ["eval.k_percents=[5.0]", "eval.keep_rows=true", "eval.groups=[unseen,new_user,new_item]"]
    out = Pipeline(exp, {}, {}, {})
    for m, extra in {"prerec": [], "prerec_n": PREREC_N}.items():
        out.pre[m] = job("pretrain", world, exp / f"pre_{m}_s0", *TWO, *rows, *extra)
        held_out = [*rows, *extra, "data.train_domains=[]", "data.eval_domains=[games]", "ps.backend=local",
                    f"init_from={out.pre[m]['checkpoint']}"]
        out.zs[m] = job("evaluate", world, exp / f"zs_{m}_s0", *held_out, "model.inference=zero_shot")
        out.ft[m] = job("finetune", world, exp / f"ft_{m}_s0", *rows, *extra, "data.train_domains=[games]",
                        "data.eval_domains=[games]", "train.epochs=1", "scale.workers=1", "ps.backend=local",
                        f"init_from={out.pre[m]['checkpoint']}")
    return out


def job(name: str, world: tuple[str, str], run_dir: Path, *extra: str) -> dict:
    """`python -m jobs.<name>` in process: its metrics.json, as the results scripts read it."""
    main = importlib.import_module(f"jobs.{name}").main
    url, cache = world
    argv = ["--config", "configs/prerec_demo.yaml", f"run_dir={run_dir}", f"data.world_url={url}",
            f"model.text_cache={cache}", *SMALL, *extra]
    assert main(argv) == 0, name
    return json.loads((run_dir / "metrics.json").read_text())


def ndcg(summary: dict, scorer: str = "prerec") -> float:
    return summary[scorer]["full"]["ndcg@10"]


@pytest.mark.ray
def test_prerec_pipeline_on_two_workers_and_a_ray_ps(pipeline, world, tmp_path):
    """Pre-train -> zero-shot -> fine-tune, as docs/results/prerec.md runs it, on a tiny world."""
    for m, s in pipeline.pre.items():  # both variants learn from the sources and beat popularity
        assert s["stop_reason"] == "epochs", m
        assert ndcg(s["test"]) > ndcg(s["test"], "pop") + 0.02, (m, s["test"])
    # the evaluate job reproduces the pre-training run's test from its checkpoint (2-worker Ray PS -> local PS)
    pre = pipeline.pre["prerec"]
    again = run_evaluate(config(world, tmp_path / "again", "ps.backend=local", f"init_from={pre['checkpoint']}"))
    assert ndcg(again["test"]) == pytest.approx(ndcg(pre["test"]), abs=1e-6)
    assert again["checkpoint_step"] == load_state(pre["checkpoint"]).step
    # zero-shot drops D and the offsets: on a trained domain it changes the scores; on the held-out
    # domain (D_games and its offsets were never trained, so 0) it is what the model does anyway
    local = ["ps.backend=local", f"init_from={pipeline.pre['prerec']['checkpoint']}", "data.train_domains=[]"]
    books = {inf: ndcg(run_evaluate(config(world, tmp_path / f"books_{inf}", *local, "data.eval_domains=[books]",
                                           f"model.inference={inf}"))["test"]) for inf in ("auto", "zero_shot")}
    assert books["auto"] != pytest.approx(books["zero_shot"], abs=1e-4), books
    auto = run_evaluate(config(world, tmp_path / "auto", *local, "data.eval_domains=[games]"))
    zs = pipeline.zs["prerec"]
    assert ndcg(zs["test"]) == pytest.approx(ndcg(auto["test"]), abs=1e-6)
    for m in pipeline.zs:
        assert ndcg(pipeline.zs[m]["test"]) > ndcg(zs["test"], "random") + 0.05, m
    # fine-tuning starts from the checkpoint: its first loss on games is far below a fresh model's
    # (log(1 + negatives) = 3.50 with 32 negatives)
    for m, ft in pipeline.ft.items():
        assert ft["stop_reason"] == "epochs", m
        losses = curve(pipeline.exp / f"ft_{m}_s0")
        assert losses[min(losses)] < 0.8 * np.log(33), (m, losses)


def test_results_configs_and_table_scripts_run_on_the_tiny_pipeline(pipeline, tmp_path, capsys):
    from scripts import prerec_incremental, prerec_runs, prerec_tables

    # every job of the results experiment loads and passes the range checks with its results config
    for job in prerec_runs.jobs([0, 1]):
        check_ranges(load_config(EngineConfig, job.config, [f"run_dir={tmp_path}", *job.overrides]))
    # the results tables, with their paired per-row comparisons, from the tiny run
    prerec_tables.main([str(pipeline.exp), "--seeds", "0", "--settings", "zs", "ft", "pre"])
    out = capsys.readouterr().out
    for title in ("zero-shot", "fine-tuned", "Source markets"):
        assert title in out
    assert out.count("| PreRec (1 seeds) |") == 3 and out.count("| PreRec − PreRec_n | rndcg@5% |") == 3
    zs = pipeline.zs["prerec"]["test"]["prerec"]["full"]
    assert f"| PreRec (1 seeds) | {zs['count']}" in out and f"{zs['recall@5%']:.4f}" in out
    # the incremental sweep: its job lines load, and its table and plot come out of finished runs
    args = prerec_incremental.parser().parse_args(
        ["--pre", str(pipeline.exp / "pre_prerec_s0"), "--pre-n", str(pipeline.exp / "pre_prerec_n_s0"),
         "--out", str(tmp_path / "inc"), "--ns", "0", "--plot", str(tmp_path / "inc.png")])
    cmds = prerec_incremental.commands(args)
    for cmd in cmds.values():
        config_at = cmd.index("--config") + 1
        check_ranges(load_config(EngineConfig, cmd[config_at], cmd[config_at + 1:]))
    (tmp_path / "inc").mkdir()
    for (method, n), cmd in cmds.items():  # the tiny runs stand in for the sweep's points
        source = {("PreRec", -1): "zs_prerec_s0", ("PreRec_n", -1): "zs_prerec_n_s0",
                  ("PreRec", 0): "ft_prerec_s0", ("PreRec_n", 0): "ft_prerec_n_s0"}.get((method, n))
        if source:
            prerec_incremental.run_dir_of(cmd).symlink_to(pipeline.exp / source)
    rows = prerec_incremental.collect(args)
    assert {(r["method"], r["n"]) for r in rows} >= {("PreRec", -1), ("PreRec", 0), ("PreRec_n", 0), ("POP", -1)}
    assert "| PreRec |" in prerec_incremental.incremental_table(rows)
    prerec_incremental.plot(rows, tmp_path / "inc.png")
    assert (tmp_path / "inc.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def runs(pipeline, world, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    base = tmp_path_factory.mktemp("prerec_runs")
    out = {"two": (pipeline.pre["prerec"], pipeline.exp / "pre_prerec_s0")}
    for name, extra in {"ray1": ["scale.workers=1", "ps.backend=ray", "ps.shards=2"],
                        "local1": ["scale.workers=1", "ps.backend=local"]}.items():
        out[name] = (train(config(world, base / name, *extra)), base / name)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_pretrains_on_source_domains_and_beats_the_baselines(runs):
    s, run_dir = runs["two"]
    assert s["stop_reason"] == "epochs" and s["epochs"] == 2
    test = s["test"]
    assert test["prerec"]["full"]["ndcg@10"] > test["random"]["full"]["ndcg@10"] + 0.05
    print({k: round(v["full"]["ndcg@10"], 4) for k, v in test.items()})
    losses = curve(run_dir)
    assert losses[max(losses)] < losses[min(losses)]
    # only the source domains were trained on; the model's export hook wrote item and test-user vectors
    doms = {d for ds in pq.read_table(run_dir / "data" / "train", columns=["domains"])["domains"].to_pylist()
            for d in ds}
    assert doms == {"books", "movies"}
    assert Path(s["embeddings"]["item"]).exists() and Path(s["embeddings"]["user"]).exists()


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_in_process_ps_matches_ray_ps(runs):
    (a, da), (b, db) = runs["local1"], runs["ray1"]
    ca, cb = curve(da), curve(db)
    assert ca.keys() == cb.keys() and len(ca) > 5
    np.testing.assert_allclose([ca[k] for k in sorted(ca)], [cb[k] for k in sorted(cb)], rtol=1e-4)
    assert a["test"]["prerec"]["full"]["ndcg@10"] == pytest.approx(b["test"]["prerec"]["full"]["ndcg@10"],
                                                                   abs=1e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_match_one_worker_within_noise(runs):
    """Same global batch and seed; the data order differs (each worker shuffles its own shard)."""
    two, one = runs["two"][0]["test"]["prerec"]["full"], runs["ray1"][0]["test"]["prerec"]["full"]
    assert two["ndcg@10"] == pytest.approx(one["ndcg@10"], abs=0.03)
    assert two["hr@10"] == pytest.approx(one["hr@10"], abs=0.05)


# ---------------------------------------------------------------- engine rows -> PreRec rows (no Ray)


def test_cross_domain_rows_split_per_domain_in_time_order():
    import pyarrow as pa

    from xdtrain.models.prerec_data import split_by_domain

    rows = pa.table({"user_id": [7, 9], "items": [[1, 2, 3, 4], [5]], "timestamps": [[10, 11, 12, 13], [20]],
                     "domains": [["a", "b", "a", "b"], ["b"]]})
    out = split_by_domain(rows).to_pydict()
    assert out == {"user_id": [7, 7, 9], "domain": ["a", "b", "b"], "items": [[1, 3], [2, 4], [5]],
                   "timestamps": [[10, 12], [11, 13], [20]]}


def test_eval_history_keeps_the_rows_own_domain():
    import pyarrow as pa

    from xdtrain.models.prerec_data import in_domain_histories

    rows = pa.table({"domain": ["a", "b", "a"], "history": [[1, 2, 3], [4, 5], []],
                     "history_domains": [["a", "b", "a"], ["a", "a"], []]})
    assert [h.tolist() for h in in_domain_histories(rows)] == [[1, 3], [], []]
    assert in_domain_histories(rows.drop_columns(["history_domains"])) is None
