"""AMID's two-domain rows (xdtrain/data/amid_rows.py): both input paths, K_u, splits, negatives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from amidkit import DOMAINS, FIXTURE, PAIR, fixture_config, fixture_logs

from xdtrain.config import load_config
from xdtrain.data.amid_rows import (
    make_rows,
    read_released,
    read_released_csv,
    rows_from_interactions,
    rows_from_logs,
    split_rows,
    strip_target,
    subsample_observed,
)
from xdtrain.data.schemas import DataError
from xdtrain.eval.candidates import CandidateSpec, prepare_candidates
from xdtrain.models.amid import Amid, AmidConfig
from xdtrain.train.config import EngineConfig
from xdtrain.train.datasets import prepare_data


def keys(t: pa.Table) -> set:
    return set(zip(t["user_id"].to_pylist(), t["domain_id"].to_pylist()))


def test_released_fixture_and_the_logs_path_give_the_same_rows():
    cfg = fixture_config()
    a, b = rows_from_logs(fixture_logs(), cfg), read_released(FIXTURE, PAIR, cfg)
    for part in ("O", "D", "valid", "test"):
        assert getattr(a, part).equals(getattr(b, part)), part
    assert a.O.num_rows > 0 and a.valid.num_rows > 0 and a.test.num_rows > 0


def test_prepare_data_gives_the_same_streams_and_eval_rows_from_parquet_logs_and_released_csvs(tmp_path):
    pq.write_table(fixture_logs(), tmp_path / "logs.parquet")
    common = ["data.recipe=amid", "data.k_u=0.25", "data.valid_ratio=0.15", f"data.pair={PAIR}"]
    runs = {}
    for name, extra in (("logs", ["data.source=parquet", f"data.interactions_url={tmp_path / 'logs.parquet'}"]),
                        ("released", ["data.source=released", f"data.released_dir={FIXTURE}"])):
        cfg = load_config(EngineConfig, "configs/amid_released.yaml", common + extra)
        runs[name] = prepare_data(cfg.data, tmp_path / name)
    a, b = runs["logs"], runs["released"]
    assert set(a.streams) == {"O", "D"} and a.stream_tables["O"] == "two_domain_rows"
    for s in ("O", "D"):
        assert pq.read_table(a.streams[s]).equals(pq.read_table(b.streams[s]))
    assert a.test.rows.equals(b.test.rows) and a.valid.rows.equals(b.valid.rows)
    assert a.model_data.domains == list(DOMAINS)


@pytest.mark.parametrize("n_ov, n_no, k_u, want", [
    (4478, 14567, 0.25, 8119), (4478, 14567, 0.75, 15403),    # Cloth-Sport (spec §2.4)
    (2401, 77599, 0.25, 21800), (2401, 77599, 0.75, 60600),   # Loan-Fund
])
def test_k_u_keeps_every_overlapping_row_and_int_k_u_of_the_others(n_ov, n_no, k_u, want):
    n = n_ov + n_no
    rows = make_rows(np.arange(n), [[1]] * n, [[2]] * n_ov + [[]] * n_no, np.zeros(n))
    O, D = subsample_observed(rows, k_u, seed=3)  # noqa: E741
    assert O.num_rows == want and D.num_rows == n
    assert pc.sum(O["overlap"]).as_py() == n_ov
    ob = D["ob_label"].to_numpy()
    assert keys(D.filter(pa.array(ob == 1))) == keys(O) and ob.sum() == want


def test_mnar_keeps_the_exact_count_and_observes_rows_with_popular_targets_more_or_less_often():
    # 300 non-overlapping rows [9, 2, target]: target 1 (100 rows), 2 (100) or one of 3..102 (once each);
    # counts in all lists: item 2 400 (every list, twice where it is the target), item 1 100, the rest 1
    n_no = 300
    targets = [1] * 100 + [2] * 100 + list(range(3, 103))
    seqs = [[9, 2, t] for t in targets]
    rows = make_rows(np.arange(n_no + 10), seqs + [[1]] * 10, [[]] * n_no + [[5]] * 10, np.zeros(n_no + 10))
    base = subsample_observed(rows, 0.25, seed=3)[0]
    assert base.equals(subsample_observed(rows, 0.25, seed=3, mnar=0.0)[0])  # mnar 0: the released draw
    O, D = subsample_observed(rows, 0.25, seed=3, mnar=2.0)  # noqa: E741
    assert O.num_rows == 10 + 75 and pc.sum(O["overlap"]).as_py() == 10  # counts as without MNAR
    kept = strip_target(O.filter(pc.invert(O["overlap"])))[0]
    # weights ∝ count²: 100 rows at 400², 100 at 100², 100 at 1² (94% of the mass on target 2's rows)
    assert (kept == 2).mean() > 0.7 and (kept > 2).sum() <= 2
    O_rare = subsample_observed(rows, 0.25, seed=3, mnar=-1.0)[0]
    rare = strip_target(O_rare.filter(pc.invert(O_rare["overlap"])))[0]
    # weights ∝ 1 / count: 100 rows at 1/400, 100 at 1/100, 100 at 1 (80% of the mass on the rare rows)
    assert (rare > 2).mean() > 0.6 and (rare == 2).sum() <= 3
    with pytest.raises(DataError, match="data.mnar"):
        subsample_observed(rows, 0.25, seed=3, mnar=float("nan"))


def test_splits_share_no_row_valid_is_observed_and_the_target_is_never_in_its_history():
    rows = rows_from_logs(fixture_logs(), fixture_config())
    assert not keys(rows.D) & keys(rows.test) and not keys(rows.valid) & keys(rows.D)
    assert keys(rows.O) <= keys(rows.D)
    assert set(rows.valid["ob_label"].to_pylist()) == {1}
    targets, s1, s2 = strip_target(rows.test)
    for t, a, b, x in zip(targets, s1, s2, rows.test["domain_id"].to_pylist()):
        assert t not in (a if x == 0 else b)


def test_target_removal_left_truncation_and_the_nmcdr_row_rule():
    inter = pa.table({"user_id": [1] * 9 + [2] * 5 + [3] * 8, "domain": ["cloth"] * 6 + ["sport"] * 3 + ["sport"] * 5
                      + ["cloth"] * 5 + ["sport"] * 3,
                      "item_id": [5, 7, 5, 8, 9, 5, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008,
                                  10, 11, 12, 13, 14, 1010, 1011, 1012],
                      "timestamp": list(range(22))})
    rows = rows_from_interactions(inter, fixture_config())
    # user 1: cloth has 6 but sport 3 (< 5, not 0): no row; user 2: sport only; user 3: cloth 5, sport 3: none
    assert keys(rows) == {(2, 1)}
    rows = make_rows([1], [[5, 7, 5, 8, 9, 5]], [[]], [0])
    targets, s1, _ = strip_target(rows)
    assert targets.tolist() == [5] and s1 == [[7, 8, 9]]
    model = Amid(AmidConfig(d=8, max_len=2, layers=1, heads=1), list(DOMAINS), {"cloth": np.arange(20),
                                                                                "sport": np.arange(1000, 1020)})
    b = model.make_batch(rows, np.random.default_rng(0))
    assert b["d1"].tolist() == [[8, 9]] and b["d2"].tolist() == [[-1, -1]] and b["cand"][0, 0] == 5


def test_training_negatives_come_from_the_target_domain_never_from_the_users_items_and_change_each_draw():
    rows = rows_from_logs(fixture_logs(), fixture_config()).D
    cat = {"cloth": np.arange(80), "sport": np.arange(1000, 1080)}
    model = Amid(AmidConfig(d=8, max_len=5, layers=1, heads=1), list(DOMAINS), cat)
    rng = np.random.default_rng(0)
    a, b = model.make_batch(rows, rng), model.make_batch(rows, rng)
    s = [rows["seq_d1"].to_pylist(), rows["seq_d2"].to_pylist()]
    for i, x in enumerate(rows["domain_id"].to_pylist()):
        neg = int(a["cand"][i, 1])
        assert neg in cat[DOMAINS[x]] and neg not in s[x][i]
    assert not np.array_equal(a["cand"][:, 1], b["cand"][:, 1])


def test_test_negatives_are_fixed_per_seed_in_domain_and_exclude_the_users_items(tmp_path):
    cfg = load_config(EngineConfig, "configs/amid_released.yaml", [f"data.released_dir={FIXTURE}"])
    test = prepare_data(cfg.data, tmp_path).test
    spec = CandidateSpec.parse("uniform:50", True, 7, 1.0)
    c1, c2 = prepare_candidates(test, spec), prepare_candidates(test, spec)
    neg = np.asarray(c1.negatives)
    assert neg.shape == (test.num_rows, 50) and np.array_equal(neg, np.asarray(c2.negatives))
    other = np.asarray(prepare_candidates(test, CandidateSpec.parse("uniform:50", True, 8, 1.0)).negatives)
    assert not np.array_equal(neg, other)
    rows = test.rows.to_pylist()
    for r, n in zip(rows, neg):
        assert set(n.tolist()) <= set(test.catalogue[r["domain"]].tolist())
        assert not set(n.tolist()) & (set(r["history"]) | {r["item_id"]})


def test_released_reader_names_file_and_line_and_checks_o_against_d(tmp_path):
    bad = tmp_path / "x_test.csv"
    bad.write_text('user_id,seq_d1,seq_d2,domain_id\n1,"[1, 2]",[],0\n2,"[1, oops]",[],0\n')
    with pytest.raises(DataError, match=r"x_test.csv row 3 column seq_d1"):
        read_released_csv(bad)
    bad.write_text('user_id,seq_d1,seq_d2,domain_id\n1,"[1, 2]",[],1\n')
    with pytest.raises(DataError, match=r"x_test.csv row 2 column domain_id: 1 names an empty sequence"):
        read_released_csv(bad)
    for f in FIXTURE.glob(f"{PAIR}_*.csv"):
        (tmp_path / f.name).write_text(f.read_text())
    o = tmp_path / f"{PAIR}_train25.csv"
    lines = o.read_text().splitlines()
    o.write_text("\n".join(lines[:-1]) + "\n")  # drop one observed row
    with pytest.raises(DataError, match="not the ob_label = 1 rows"):
        read_released(tmp_path, PAIR, fixture_config())
    with pytest.raises(DataError, match="cloth_shoes_train25.csv: no such file"):
        read_released(tmp_path, "cloth_shoes", fixture_config())


def test_split_is_80_20_by_row():
    rows = rows_from_interactions(fixture_logs(), fixture_config())
    train, test = split_rows(rows, 0.2, seed=0)
    assert train.num_rows + test.num_rows == rows.num_rows and abs(test.num_rows - 0.2 * rows.num_rows) <= 1


def test_eval_tie_policy_reaches_the_evaluator_all_tied_positives_rank_last(tmp_path):
    import torch

    from xdtrain.train.config import EvalSection
    from xdtrain.train.evaluation import RankingEval

    cfg = load_config(EngineConfig, "configs/amid_released.yaml", [f"data.released_dir={FIXTURE}"])
    test = prepare_data(cfg.data, tmp_path).test
    tied = lambda users, items, domain: torch.zeros(items.shape, dtype=torch.float32)  # noqa: E731
    for policy, rank in (("pessimistic", 21.0), ("average", 11.0)):  # 1-based, of 21 candidates
        ev = RankingEval(test, EvalSection(candidates=["uniform:20"], tie_policy=policy, ks=[10]))
        out = ev.flat(tied)
        assert out["uniform:20/rank"] == pytest.approx(rank)
        assert (out["uniform:20/hr@10"] == 0.0) is (policy == "pessimistic")


def test_hide_other_turns_a_share_of_both_domain_users_into_single_domain_users():
    full = rows_from_interactions(fixture_logs(), fixture_config())
    hidden = rows_from_interactions(fixture_logs(), fixture_config(hide_other=0.5))
    n_full, n_hidden = (pc.sum(t["overlap"]).as_py() for t in (full, hidden))
    assert 0 < n_hidden < 0.8 * n_full
    assert set(hidden["user_id"].to_pylist()) <= set(full["user_id"].to_pylist())
