"""PreRec spec tests E3-E6 (specs/prerec.md sec. 9.2) on planted synthetic worlds (tests/prerec_kit.py).

E3  normalisation: the power-mean F against raw counts (Method A) and traffic shares (Method B), and
    the KS distances of g(F) between domains.
E4  the cross-domain confounder D (zeroed at zero-shot) against no D, in a world with a per-domain
    item-space shift and a large taste shift, and in a control world with neither; a linear probe of
    the learned D_k against the planted shifts through W_e A.
E5  fine-tuning on N target users against zero-shot and a from-scratch model.
E6  the true generative scorer upper-bounds every model; Random matches the closed form.

Slow tests train 3 seeds each and compare paired by seed (mean over seeds against 2 standard errors);
where the method loses, the test is an xfail with the measured numbers. Fast tests check the same
mechanisms at layer level. Results: docs/results/prerec_synthetic.md.

    nice .venv/bin/pytest -m slow tests/test_prerec_e3_e6.py -q -rxX -s
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from prerec_kit import (
    BASE,
    CONFORMITY,
    METRICS,
    SEEDS,
    SOURCES,
    TARGETS,
    Planted,
    cached,
    evaluate_rows,
    fit,
    in_domains,
    make_world,
    new_model,
    no_domain,
    paired,
    summary,
    target_rows,
    trained,
    with_ps,
)
from scipy import stats

from xdtrain.data.popularity import PopularityIndex, WindowPopularityScorer
from xdtrain.data.synthetic.text import text_matrix
from xdtrain.eval.evaluator import RandomScorer, user_batch
from xdtrain.eval.metrics import random_expectation, rndcg_gains
from xdtrain.models.prerec import PreRec, PreRecConfig
from xdtrain.nn.sparse import pull_rows
from xdtrain.ps import LocalPS


def _scaled(scale: str) -> PreRecConfig:
    return replace(BASE, pop=replace(BASE.pop, scale=scale))


COUNT, SHARE = _scaled("count"), _scaled("share")


def _assert_gain(diffs: dict[str, np.ndarray]) -> None:
    """The directional claim: the mean per-seed gain is above 2 standard errors, for every metric."""
    for m, d in diffs.items():
        mean, se = summary(d)
        assert mean > 2 * se, (m, np.round(d, 4).tolist(), mean, se)


# ---------------------------------------------------------------- E3: normalisation matters


E3A_COUNTS = ("measured 2026-12-04 (3 seeds, E1 world): power mean - raw counts Recall@5% +0.0032 +- 0.0041 "
              "(-0.0046 / +0.0091 / +0.0049), r-NDCG@5% +0.0105 +- 0.0055 (+0.0146 / -0.0005 / +0.0173): not > 2 SE")
E3B_COUNTS = ("measured 2026-12-04: mean pairwise KS of g(F), power mean 0.170 / 0.188 / 0.192 against raw counts "
              "0.138 / 0.171 / 0.161: counts line up better here (docs/results/prerec_synthetic.md)")


def _alternatives(count_xfail: str) -> list:
    """The alternatives to the power mean; raw counts (Method A) as a measured expected failure."""
    return ["share", pytest.param("count", marks=pytest.mark.xfail(strict=True, reason=count_xfail))]


@pytest.mark.slow
@pytest.mark.parametrize("alt", _alternatives(E3A_COUNTS))
def test_e3a_power_mean_beats_counts_and_shares(alt):
    """E1 world (targets: 1/10-1/2 of the sources' traffic, other catalogue sizes): zero-shot PreRec with
    the power-mean F against the same model with raw counts (Method A) or traffic shares (Method B)."""
    other = {"share": SHARE, "count": COUNT}[alt]
    _assert_gain(paired({s: trained(CONFORMITY, BASE, s).metrics for s in SEEDS},
                        {s: trained(CONFORMITY, other, s).metrics for s in SEEDS}, f"E3 power mean vs {alt}"))


def pop_scalar(model: PreRec, F: np.ndarray) -> np.ndarray:
    """g(F): the user-independent popularity logit, Z(F) W_z (paper) or g(F) (code)."""
    with torch.no_grad():
        Z = model.f_pop(torch.from_numpy(F))
        return (Z.squeeze(-1) if model.cfg.variant == "code" else Z @ model.W_z).numpy()


def mean_ks(model: PreRec, pop: PopularityIndex, days: np.ndarray) -> float:
    """Mean pairwise KS distance between the domains' g(F) over every (catalogue item, day)."""
    g = {}
    for d in SOURCES + TARGETS:
        cat = model.text.catalogue(d)
        g[d] = pop_scalar(model, pop.factors(d, cat[:, None], days[None, :]).reshape(-1, pop.cfg.orders))
    doms = list(g)
    return float(np.mean([stats.ks_2samp(g[a], g[b]).statistic
                          for i, a in enumerate(doms) for b in doms[i + 1:]]))


@pytest.mark.slow
@pytest.mark.parametrize("alt", _alternatives(E3B_COUNTS))
def test_e3b_power_mean_aligns_g_of_F_across_domains(alt):
    """Fig. 5's check: under the power mean the domains' g(F) distributions are closer (mean pairwise KS
    distance over the 5 domains and days 30-89, each model's own g) than under the alternative, in every seed."""
    other, ks = {"share": SHARE, "count": COUNT}[alt], {}
    for s in SEEDS:
        days = make_world(s, CONFORMITY).world.epoch0 // 86400 + np.arange(30, 90)  # absolute day numbers
        ks[s] = {name: mean_ks(trained(CONFORMITY, cfg, s).model, trained(CONFORMITY, cfg, s).model.popularity, days)
                 for name, cfg in (("power_mean", BASE), (alt, other))}
        print(f"E3b seed={s} mean pairwise KS of g(F): " + "  ".join(f"{k} {v:.3f}" for k, v in ks[s].items()))
    assert all(k["power_mean"] < k[alt] for k in ks.values()), ks


# ---------------------------------------------------------------- E4: the domain confounder D

SHIFTED = {"sigma_d": 2.0, "item_shift": 2.0}  # taste shift and a per-domain item-space shift
CONTROL = {"sigma_d": 0.0, "item_shift": 0.0}


def _d_gain(world: dict[str, float], cfg: PreRecConfig = BASE) -> dict[str, np.ndarray]:
    """Per-seed zero-shot gain of D (zeroed at test): PreRec minus the same model without D."""
    return paired({s: trained(CONFORMITY, cfg, s, **world).metrics for s in SEEDS},
                  {s: trained(CONFORMITY, no_domain(cfg), s, **world).metrics for s in SEEDS}, f"E4 D vs no D {world}")


@pytest.mark.slow
def test_e4a_domain_confounder_helps_zero_shot_with_domain_shift():
    _assert_gain(_d_gain(SHIFTED))


@pytest.mark.slow
def test_e4c_control_no_benefit_without_domain_shift():
    """sigma_d = 0, no item shift: D has nothing to absorb, so it must not help beyond noise; its gain
    is also smaller than in the shifted world (paired by seed)."""
    control, shifted = _d_gain(CONTROL), _d_gain(SHIFTED)
    for m in METRICS:
        mean, se = summary(control[m])
        assert mean < 2 * se, (m, mean, se)
        dm, dse = summary(shifted[m] - control[m])
        print(f"  E4 {m}: gain(shifted) - gain(control) {dm:+.4f} +- {dse:.4f} (SE)")


def probes(model: PreRec, w: Planted) -> dict[str, float]:
    """Linear probes of the learned D_k (source domains) through P = W_e A (text map, then f_NN), Pearson r
    pooled over domains and dimensions:
      item space   D_k against P x_k, for x = delta (taste shift) and s (item shift);
      taste space  P^T (u(D_k) - u(0)) against delta_k, s_k: the change D_k makes to the state of a user
                   with no history, read as a taste in the planted latent space (u . m_j = (P^T u) . g_j)."""
    P = model.f_nn.weight.detach().double().numpy() @ text_matrix(w.world)  # [d, L]
    k = [w.world.domain_names.index(d) for d in model.domains]
    D = model.D.detach().double().numpy()
    model.eval()
    with torch.no_grad():
        K, dom = len(k), torch.arange(len(k))
        hist, mask = torch.zeros(K, 1, dtype=torch.long), torch.zeros(K, 1, dtype=torch.bool)
        m = torch.zeros(1, model.cfg.d)  # no history: only the prior token is real
        u = model.user_states(m, None, hist, mask, dom, model.D, with_prior=True)[:, 0]
        u0 = model.user_states(m, None, hist, mask, dom, None, with_prior=True)[:, 0]
    taste = (u - u0).double().numpy() @ P  # [K, L]
    r = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    wd = w.world
    return {"item delta": r(wd.delta[k] @ P.T, D), "item s": r(wd.item_shift[k] @ P.T, D),
            "taste delta": r(taste, wd.delta[k]), "taste s": r(taste, wd.item_shift[k])}


def _probe_runs() -> dict[int, dict[str, float]]:
    out = {}
    for s in SEEDS:
        out[s] = probes(trained(CONFORMITY, BASE, s, **SHIFTED).model, make_world(s, CONFORMITY, **SHIFTED))
        print(f"E4b seed={s}: " + "  ".join(f"r({k}) {v:+.3f}" for k, v in out[s].items()))
    return out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-04: r(taste delta) -0.111 / +0.331 / -0.005, mean +0.072 +- "
                   "0.133 (SE); item-space probe r(D, W_e A delta) +0.127 / -0.003 / +0.093")
def test_e4b_learned_d_correlates_with_planted_taste_shift():
    """The spec's probe: the D_k of the shifted world, read as a taste through W_e A (`probes`), correlate
    with the planted delta_k, r > 0 by more than 2 SE over seeds."""
    rs = np.array([p["taste delta"] for p in _probe_runs().values()])
    mean, se = summary(rs)
    assert mean > 2 * se, (rs.tolist(), mean, se)


@pytest.mark.slow
def test_e4b_learned_d_counters_the_planted_item_shift():
    """What D does absorb (found by the probes above): read as a taste, D_k points against the domain's
    item-space shift s_k, which every history token m_j = W_e A (g_j + s_k) + ... carries; r < 0 by more
    than 2 SE over seeds."""
    rs = np.array([p["taste s"] for p in _probe_runs().values()])
    mean, se = summary(rs)
    assert mean < -2 * se, (rs.tolist(), mean, se)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_e4_mechanism_d_is_trained_and_only_there(variant):
    """Layer level, fast: D enters the training loss (its rows of the batch's domains get gradient,
    the loss moves with D), and without D (use_domain=False) the loss ignores it. T8 in test_prerec.py
    checks the other half, that zero-shot scoring drops D."""
    w = make_world(0, CONFORMITY, n_users=400, **SHIFTED)
    cfg = replace(BASE, variant=variant, dropout=0.0, negatives=8)
    seqs = in_domains(w.seqs, SOURCES[:2])
    for use_domain in (True, False):
        model, ps = new_model(w, replace(cfg, use_domain=use_domain), SOURCES, 0)
        rng = np.random.default_rng(0)
        batch = model.make_batch(seqs.take(np.arange(16)), rng)
        def loss(batch=batch, model=model, ps=ps) -> torch.Tensor:
            return model(batch, pull_rows(ps, model.sparse_ids(batch)))

        loss().backward()
        grad = model.D.grad if model.D.grad is not None else torch.zeros_like(model.D)
        before = loss().item()
        with torch.no_grad():
            model.D.normal_()
        moved = loss().item() != before
        in_batch = sorted({model.domains.index(d) for d in seqs.take(np.arange(16))["domain"].to_pylist()})
        if use_domain:
            assert moved and all(grad[k].abs().sum() > 0 for k in in_batch), (variant, grad)
            assert grad[2].abs().sum() == 0  # src_c is not in the batch: only its prior could act, at D = 0
        else:
            assert not moved and grad.abs().sum() == 0


# ---------------------------------------------------------------- E5: fine-tuning

E5_USERS = 16000  # a bigger world: ~2200 target sequences, half held out for evaluation
FT_STEPS, SCRATCH_STEPS = 150, 300


def _e5(seed: int) -> dict[str, dict[str, float]]:
    """Metrics on held-out target sequences of: zero-shot PreRec, and per N the fine-tuned PreRec and a
    from-scratch PreRec trained on N target sequences (the same N for both)."""
    w = make_world(seed, CONFORMITY, n_users=E5_USERS)
    tgt = in_domains(w.seqs, TARGETS)
    order = np.random.default_rng(seed).permutation(tgt.num_rows)
    held, pool = tgt.take(order[: tgt.num_rows // 2]), tgt.take(order[tgt.num_rows // 2:])
    rows = target_rows(held, BASE.max_len)
    pre, ps = new_model(w, BASE, SOURCES, seed)
    fit(pre, ps, in_domains(w.seqs, SOURCES), seed)
    out = {"zero-shot": evaluate_rows(pre.scorer(rows, LocalPS().pull), rows, w.text)}  # targets: no PS rows
    for n in (100, 1000):
        train = pool.take(np.arange(n))
        ft = PreRec.transfer(pre, TARGETS)
        ft_ps = with_ps(ft)
        fit(ft, ft_ps, train, seed, FT_STEPS)
        out[f"fine-tuned N={n}"] = evaluate_rows(ft.scorer(rows, ft_ps.pull), rows, w.text)
        scratch, s_ps = new_model(w, BASE, TARGETS, seed)
        fit(scratch, s_ps, train, seed, SCRATCH_STEPS)
        out[f"scratch N={n}"] = evaluate_rows(scratch.scorer(rows, s_ps.pull), rows, w.text)
    return out


def e5_paired(a: str, b: str) -> dict[str, np.ndarray]:
    """Per-seed differences a - b between two of `_e5`'s models (each seed's runs made once per session)."""
    r = {s: cached(("e5", s), lambda s=s: _e5(s)) for s in SEEDS}
    return paired({s: r[s][a] for s in SEEDS}, {s: r[s][b] for s in SEEDS}, f"E5 {a} vs {b}")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-04: fine-tuned - scratch at N=100, Recall@5% +0.0077 +- 0.0063"
                   " (-0.0046 / +0.0118 / +0.0160), r-NDCG@5% +0.0081 +- 0.0048 (+0.0177 / +0.0045 / +0.0022): ahead, "
                   "not by 2 SE")
def test_e5a_fine_tuned_beats_from_scratch_at_small_n():
    _assert_gain(e5_paired("fine-tuned N=100", "scratch N=100"))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-04: fine-tuned - zero-shot at N=100, Recall@5% +0.0064 +- "
                   "0.0042 (-0.0017 / +0.0084 / +0.0125), r-NDCG@5% +0.0065 +- 0.0150 (+0.0038 / -0.0180 / +0.0337)")
def test_e5a_fine_tuned_beats_zero_shot_at_small_n():
    _assert_gain(e5_paired("fine-tuned N=100", "zero-shot"))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-04: gap(N=100) - gap(N=1000), Recall@5% +0.0062 +- 0.0065 "
                   "(-0.0068 / +0.0120 / +0.0134); gap at N=1000 +0.0015 +- 0.0009 Recall, +0.0031 +- 0.0149 r-NDCG")
def test_e5b_gap_to_scratch_shrinks_as_n_grows():
    gap = {n: e5_paired(f"fine-tuned N={n}", f"scratch N={n}") for n in (100, 1000)}
    _assert_gain({m: gap[100][m] - gap[1000][m] for m in METRICS})


# ---------------------------------------------------------------- E6: oracle and Random


class OracleScorer:
    """The planted generative model's log P(next item | state) for eval rows (user_id, history,
    timestamp): the sticky cluster chain, then the softmax over the cluster's pool of
    beta_taste pref . g_j + beta_markov ghat_prev . g_j + gamma logpop_j(day), without the previous item."""

    def __init__(self, w: Planted):
        self.w, wd = w, w.world
        self.slot = np.full(wd.n_items, -1)
        self.slot[wd.hot_items] = np.arange(len(wd.hot_items))

    def __call__(self, users: dict, items: torch.Tensor, *, domain: str) -> torch.Tensor:
        wd, ch = self.w.world, self.w.world.cfg.choice
        C = wd.cfg.latent.n_clusters
        k = wd.domain_names.index(domain)
        cat = np.arange(wd.item_start[k], wd.item_start[k + 1])
        uid = users["user_id"].numpy()
        prev = users["history"].numpy()[np.arange(len(uid)), users["history_len"].numpy() - 1]
        day = (users["timestamp"].numpy() - wd.epoch0) // 86400
        pref = np.stack([self.w.pref[(int(u), domain)] for u in uid])
        ghat = wd.g[prev] / np.linalg.norm(wd.g[prev], axis=1, keepdims=True)
        util = (ch.beta_taste * pref + ch.beta_markov * ghat) @ wd.g[cat].T  # [B, N]
        hot = self.slot[cat] >= 0
        util[:, hot] += ch.gamma * wd.logpop[day[:, None], self.slot[cat][hot][None, :]]
        if not ch.allow_repeat:
            util[cat[None, :] == prev[:, None]] = -np.inf
        clus = wd.item_cluster[cat]
        lse = np.full((len(uid), C), -np.inf)
        for c in np.unique(clus):
            lse[:, c] = np.logaddexp.reduce(util[:, clus == c], axis=1)
        move = (1 - ch.stickiness) * (ch.explore / C + (1 - ch.explore) * self.w.pi[uid])  # [B, C]
        pc_ = move + ch.stickiness * (np.arange(C)[None, :] == wd.item_cluster[prev][:, None])
        logp = np.log(pc_[:, clus]) + util - lse[:, clus]
        logp = np.where(np.isfinite(logp), logp, -1e9)  # the previous item (and empty pools): never next
        pos = np.searchsorted(cat, items.numpy())
        return torch.from_numpy(logp[:, pos] if items.dim() == 1 else np.take_along_axis(logp, pos, 1))


def e6_scores(seed: int) -> dict[str, dict[str, float]]:
    w = make_world(seed, CONFORMITY)
    run = trained(CONFORMITY, BASE, seed)
    out = {"oracle": evaluate_rows(OracleScorer(w), run.rows, w.text),
           "window POP": evaluate_rows(WindowPopularityScorer(run.model.popularity), run.rows, w.text)}
    for name, cfg in (("PreRec", BASE), ("PreRec shares", SHARE), ("PreRec counts", COUNT)):
        out[name] = trained(CONFORMITY, cfg, seed).metrics
    return out


@pytest.mark.slow
def test_e6a_true_generative_scorer_upper_bounds_every_model():
    """E1 world: the oracle's Recall@5% and r-NDCG@5% are above every model's, in every seed."""
    for s in SEEDS:
        sc = e6_scores(s)
        print(f"E6 seed={s} " + "  ".join(f"{k}: {v['recall@5%']:.4f}/{v['rndcg@5%']:.4f}" for k, v in sc.items()))
        for name, v in sc.items():
            for m in METRICS:
                assert sc["oracle"][m] >= v[m], (s, name, m, sc["oracle"][m], v[m])


def random_bounds(rows: pa.Table, text) -> dict[str, tuple[float, float]]:
    """Closed form of Random (mean over domains) and its sampling SE over the rows."""
    exp, var = {m: [] for m in METRICS}, {m: [] for m in METRICS}
    for d in sorted(set(rows["domain"].to_pylist())):
        N, n = len(text.catalogue(d)), int(pc.sum(pc.equal(rows["domain"], d)).as_py())
        g = rndcg_gains(N, 5.0).numpy()
        for m, mean, sq in (("recall@5%", random_expectation("recall%", N, k_percent=5.0), len(g) / N),
                            ("rndcg@5%", random_expectation("rndcg%", N, k_percent=5.0), float((g ** 2).sum()) / N)):
            exp[m].append(mean)
            var[m].append((sq - mean**2) / n)
    return {m: (float(np.mean(exp[m])), float(np.sqrt(np.sum(var[m])) / len(var[m]))) for m in METRICS}


def test_e6b_random_matches_closed_form():
    """Fast: the Random scorer on a small world's target rows, within 3 sampling SE of the closed form."""
    w = make_world(0, CONFORMITY, n_users=1500)
    rows = target_rows(w.seqs, BASE.max_len)
    got = evaluate_rows(RandomScorer(seed=0), rows, w.text)
    for m, (mean, se) in random_bounds(rows, w.text).items():
        assert abs(got[m] - mean) < 3 * se, (m, got[m], mean, se)


def test_e6_oracle_is_a_distribution_and_ranks_the_chosen_items_high():
    """Fast: the oracle's P(next item) sums to 1 over the catalogue on every row, and it ranks the
    items the generator chose far above Random (Recall@5%)."""
    w = make_world(0, CONFORMITY, n_users=1500)
    rows = target_rows(w.seqs, BASE.max_len)
    oracle = OracleScorer(w)
    for d in TARGETS:
        idx = np.flatnonzero(np.asarray(rows["domain"].to_pylist()) == d)[:64]
        p = oracle(user_batch(rows, idx), torch.from_numpy(w.text.catalogue(d)), domain=d).exp()
        torch.testing.assert_close(p.sum(1), torch.ones(len(idx), dtype=p.dtype))
    assert evaluate_rows(oracle, rows, w.text)["recall@5%"] > 0.5
