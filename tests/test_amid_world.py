"""Spec §10.2-F: AMID end to end on the semi-synthetic open world (xdtrain/data/synthetic/open_world.py).

The world's defining behaviour is fast (default suite), and so is MIM's in the world with trends
(one seed, 12 epochs); the learning tests are slow: backbone, +MIM and +AMID (SASRec, in one process:
xdtrain/models/amid_local.py) over 3 seeds, test NDCG@10 at the best validation epoch, after checking
that the backbone learns the world at all (F0). Their measured outcomes are in docs/amid.md: F3 holds;
F1 does not in test F's world (users of a batch independent: an expected failure) and holds in the
world with trends; F2 holds at these 3 seeds but not over 10 (p = 0.42) nor in variants of this world
(an expected failure, not strict).
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from xdtrain.data.amid_rows import AmidDataConfig, rows_from_logs
from xdtrain.data.synthetic.open_world import OpenWorld, cluster_of, open_world, period_of, trending_clusters
from xdtrain.models.amid import Amid, AmidConfig
from xdtrain.models.amid_local import (
    EPOCHS_F,
    METHODS,
    MIM_N_TREND,
    MODEL_F,
    TREND_F,
    WORLD_F,
    evaluator,
    fit_and_track,
    metrics,
    period_groups,
    pick,
    world_data,
)
from xdtrain.train.local_program import local_ps

SEEDS = (0, 1, 2)


def dominant_clusters(cfg: OpenWorld) -> tuple[np.ndarray, np.ndarray]:
    """Each both-domain user's most frequent cluster in domain 1 and in domain 2."""
    inter = open_world(cfg)
    out = {}
    for k, d in enumerate(cfg.domains):
        t = inter.filter(pc.equal(inter["domain"], d))
        users, items = t["user_id"].to_numpy(), t["item_id"].to_numpy()
        out[k] = {u: np.bincount(cluster_of(cfg, items[users == u]), minlength=cfg.clusters).argmax()
                  for u in np.unique(users)}
    both = sorted(set(out[0]) & set(out[1]))
    return np.array([out[0][u] for u in both]), np.array([out[1][u] for u in both])


def test_the_world_shares_interests_across_domains_only_when_aligned():
    cfg = OpenWorld(users=400, overlap=0.5, seed=3)
    a1, a2 = dominant_clusters(cfg)
    c1, c2 = dominant_clusters(OpenWorld(users=400, overlap=0.5, seed=3, aligned=False))
    assert len(a1) > 150
    assert (a1 == a2).mean() > 0.4  # one interest mixture behind both domains
    assert abs((c1 == c2).mean() - 1 / cfg.clusters) < 0.08  # the control: chance agreement
    inter = open_world(cfg)
    lengths = pc.value_counts(inter["user_id"]).field("counts").to_numpy()
    assert lengths.min() >= cfg.len_single[0] and lengths.max() <= 2 * cfg.len_overlap[1]


def test_item_skew_makes_each_clusters_first_items_popular_and_zero_keeps_the_uniform_world():
    assert open_world(OpenWorld(users=200, seed=4)).equals(open_world(OpenWorld(users=200, seed=4, item_skew=0.0)))
    w = OpenWorld(users=600, seed=4, noise=0.0, item_skew=1.0)
    items = open_world(w)["item_id"].to_numpy()
    first = items[items < 100_000]
    rank = (first - 1) % w.items_per_cluster  # an item's place within its cluster
    share = np.bincount(rank, minlength=w.items_per_cluster) / len(rank)
    want = 1 / np.arange(1, w.items_per_cluster + 1)
    assert np.abs(share - want / want.sum()).max() < 0.02  # ∝ 1 / (k + 1)


def last_clusters(cfg: OpenWorld, k: int) -> dict[tuple[int, int], np.ndarray]:
    """(user, domain index) -> the clusters of the last `k` items of that domain list."""
    inter = open_world(cfg)
    users, items = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    dom = (inter["domain"].to_numpy(zero_copy_only=False) == cfg.domains[1]).astype(int)
    return {(int(u), z): cluster_of(cfg, items[(users == u) & (dom == z)][-k:])
            for u in np.unique(users) for z in (0, 1) if ((users == u) & (dom == z)).any()}


def test_trends_reach_the_last_items_of_both_domains_only_when_aligned_and_zero_periods_keep_the_world():
    assert open_world(OpenWorld(users=200, seed=4)).equals(open_world(OpenWorld(users=200, seed=4, trend=0.8)))
    kw = dict(users=600, overlap=0.5, noise=0.0, periods=6, trend=1.0, trend_items=2, seed=5)
    aligned, control = OpenWorld(**kw), OpenWorld(**kw, aligned=False)
    hot = trending_clusters(aligned)
    inter = open_world(aligned)
    users, ts = inter["user_id"].to_numpy(), inter["timestamp"].to_numpy()
    assert all((ts[users == u] == np.arange((users == u).sum())).all() for u in np.unique(users))  # untouched
    assert (trending_clusters(control) == hot).all()
    assert period_of(aligned, np.array([1, 100, 101, 600])).tolist() == [0, 0, 1, 5]  # blocks of user ids
    for (u, z), c in last_clusters(aligned, 2).items():
        assert (c == hot[period_of(aligned, u)]).all(), (u, z, c)
    got = last_clusters(control, 2)
    first = [(c == hot[period_of(control, u)]).all() for (u, z), c in got.items() if z == 0]
    assert all(first)
    second = np.mean([(c == hot[period_of(control, u)]).mean() for (u, z), c in got.items() if z == 1])
    chance = np.mean([(hot == hot[p]).mean() for p in range(control.periods)])  # another period's cluster
    assert abs(second - chance) < 0.06 and second < 0.5, (second, chance)


def test_the_world_gives_amid_rows_with_few_overlapping_users():
    rows = rows_from_logs(open_world(OpenWorld(users=500, seed=1)), AmidDataConfig(("d1", "d2"), k_u=0.25))
    share = pc.mean(pc.cast(rows.D["overlap"], "int64")).as_py()
    assert 0.15 < share < 0.45  # overlapping users (15%) have two rows each
    assert rows.test.num_rows > 60 and 0 < pc.sum(rows.test["overlap"]).as_py() < rows.test.num_rows


def test_mim_reads_a_periods_trend_from_its_group_and_loses_it_when_the_groups_mix_periods():
    """F1's mechanism, fast (one seed; the slow test below has three and the control world): in the
    world with trends a non-overlapping user's MIM group (users of its period) shows the period's
    trending cluster in their other-domain histories. Trained on batches in time order, +MIM beats
    the backbone on non-overlapping users; the same trained model scored with groups drawn across
    periods loses that gain, so it came through the messages."""
    torch.set_num_threads(1)
    w = OpenWorld(aligned=True, seed=0, **WORLD_F, **TREND_F)
    rows, cat, valid, test = world_data(w, 0.25, 0)
    ev = evaluator(test, "uniform:50", 0)
    got = {}
    for method in ("backbone", "mim"):
        cfg = AmidConfig(**MODEL_F, **METHODS[method], mim_n=MIM_N_TREND)
        torch.manual_seed(0)
        model = Amid(cfg, list(w.domains), cat, 0)
        ps = local_ps(model)
        fit_and_track(cfg, rows, valid, test, list(w.domains), cat, "uniform:50", 0, 12, batch_size=128,
                      evals=(ev, ev), model=model, ps=ps, groups=period_groups(w, rows))
        got[method] = metrics(model, ps, ev)["overlap=false"]["ndcg@10"]
        if method == "mim":
            mix = np.random.default_rng(0).permutation  # each domain's eval rows shuffled, then cut
            model.eval_groups = lambda idx, m=model, mix=mix: Amid.eval_groups(m, mix(idx))
            got["mim, mixed groups"] = metrics(model, ps, ev)["overlap=false"]["ndcg@10"]
    print("non-overlapping NDCG@10 after 12 epochs:", {k: round(v, 4) for k, v in got.items()})
    assert got["mim"] > got["backbone"] + 0.03
    assert got["mim, mixed groups"] < got["mim"] - 0.03


# ---------------------------------------------------------------- the learning test (slow)

WORLD, MODEL, EPOCHS = WORLD_F, MODEL_F, EPOCHS_F  # sized so that the models learn (docs/amid.md)
RANDOM_NDCG10 = sum(1 / np.log2(r + 2) for r in range(10)) / 51  # the target uniform among 51 candidates


@functools.cache
def group_metrics(method: str, aligned: bool, k_u: float, seed: int, trends: bool = False) -> dict:
    """Test metrics per group at the best validation epoch (50 fixed negatives). `trends`: the world
    with periods (TREND_F), batches in time order and eval MIM groups of one period."""
    torch.set_num_threads(1)
    w = OpenWorld(aligned=aligned, seed=seed, **WORLD, **(TREND_F if trends else {}))
    rows, cat, valid, test = world_data(w, k_u, seed)
    cfg = AmidConfig(**MODEL, **METHODS[method], **({"mim_n": MIM_N_TREND} if trends else {}))
    hist = fit_and_track(cfg, rows, valid, test, list(w.domains), cat, "uniform:50", seed, EPOCHS, batch_size=128,
                         groups=period_groups(w, rows) if trends else None)
    return pick(hist, "valid")


def non_overlapping_ndcg(method: str, aligned: bool, k_u: float, seed: int, trends: bool = False) -> float:
    """Test NDCG@10 of non-overlapping users at the best validation epoch."""
    return group_metrics(method, aligned, k_u, seed, trends)["overlap=false"]["ndcg@10"]


def mean_gain(a: str, b: str, aligned: bool, k_u: float, trends: bool = False) -> float:
    return float(np.mean([non_overlapping_ndcg(a, aligned, k_u, s, trends)
                          - non_overlapping_ndcg(b, aligned, k_u, s, trends) for s in SEEDS]))


@pytest.mark.slow
def test_f0_the_backbone_learns_the_world():
    """Without this the F checks compare untrained models."""
    ndcg = float(np.mean([group_metrics("backbone", True, 0.25, s)["all"]["ndcg@10"] for s in SEEDS]))
    print(f"F0 backbone, all test users NDCG@10 ({len(SEEDS)} seeds): {ndcg:.4f} (random {RANDOM_NDCG10:.4f})")
    assert ndcg > RANDOM_NDCG10 + 0.05


# Measured (docs/amid.md, 3 seeds, trained models, after the push_grads fix): F1 does not hold (MIM lowers
# non-overlapping users' NDCG@10 by 0.04-0.05 in both worlds; scripts/amid_mim_probe.py shows why: the
# trained eq. 3 groups are at chance, and even planted groups do not beat the backbone). F2 holds at these
# 3 seeds (AMID - MIM +0.012 at K_u 25%, -0.017 at 75%), but over 10 seeds of this world the paired
# difference is +0.009, p = 0.42, and it fails in scripts/amid_dr_probe.py's variants: a non-strict
# expectation. F3 holds.
NOT_REPRODUCED = pytest.mark.xfail(strict=False, reason="not reproduced robustly here (docs/amid.md, spec test F)")


@pytest.mark.slow
@NOT_REPRODUCED
def test_f1_mim_helps_non_overlapping_users_only_when_the_domains_share_interests():
    aligned, control = mean_gain("mim", "backbone", True, 0.25), mean_gain("mim", "backbone", False, 0.25)
    print(f"F1 MIM - backbone, non-overlapping NDCG@10 (K_u 25%, {len(SEEDS)} seeds): aligned {aligned:+.4f}, "
          f"control {control:+.4f}")
    assert aligned > 0 and control < aligned and control <= 0.005


@pytest.mark.slow
def test_f1_with_trends_mim_helps_non_overlapping_users_only_when_the_domains_share_them():
    """F1 where a MIM group can know more than the user: users of one period share a trending cluster
    (TREND_F), batches and eval groups follow time, and the aligned world's other-domain histories
    show the period's trend; the control's do not (docs/amid.md, scripts/amid_trend_probe.py)."""
    aligned, control = mean_gain("mim", "backbone", True, 0.25, True), mean_gain("mim", "backbone", False, 0.25, True)
    print(f"F1 with trends, MIM - backbone, non-overlapping NDCG@10 (K_u 25%, {len(SEEDS)} seeds): "
          f"aligned {aligned:+.4f}, control {control:+.4f}")
    assert aligned > 0.02 and control <= 0.005 and aligned > control + 0.02


@pytest.mark.slow
@NOT_REPRODUCED
def test_f2_amid_gains_more_over_mim_at_k_u_25_than_at_75():
    g25, g75 = mean_gain("amid", "mim", True, 0.25), mean_gain("amid", "mim", True, 0.75)
    print(f"F2 AMID - MIM, non-overlapping NDCG@10 ({len(SEEDS)} seeds): K_u 25% {g25:+.4f}, K_u 75% {g75:+.4f}")
    assert g25 > g75


@pytest.mark.slow
def test_f3_every_model_improves_as_k_u_rises():
    lifts = {m: float(np.mean([non_overlapping_ndcg(m, True, 0.75, s) - non_overlapping_ndcg(m, True, 0.25, s)
                               for s in SEEDS])) for m in ("backbone", "mim", "amid")}
    print("F3 K_u 75% - 25%, non-overlapping NDCG@10:", {m: round(v, 4) for m, v in lifts.items()})
    assert all(v > 0 for v in lifts.values())
