"""The MIM (xdtrain/nn/mim.py, AMID eqs. 3-6) and the AMID program (xdtrain/models/amid.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from amidkit import DOMAINS, fixture_config, fixture_logs

from xdtrain.data.amid_rows import rows_from_logs
from xdtrain.models.amid import ITEM, THETA, Amid, AmidConfig
from xdtrain.nn.mim import MIM
from xdtrain.nn.program import resolve_program
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.train.optimizers import OptimizerSet
from xdtrain.train.worker import pick_loss

N, T, D = 5, 4, 6


def states(seed: int = 0, empty_other: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randn(N, T, D, generator=g), torch.randn(N, T, D, generator=g)
    m1 = torch.ones(N, T, dtype=torch.bool)
    m1[1, 2:] = False
    m2 = torch.ones(N, T, dtype=torch.bool)
    m2[3, 1:] = False
    for i in empty_other:
        m2[i] = False
        s2[i] = 0.0
    return s1, m1, s2 * m2.unsqueeze(-1), m2


def mim(**kw) -> MIM:
    torch.manual_seed(0)
    return MIM(D, **{"score": "raw", "k": 0.0, **kw}).eval()


def test_pairwise_scores_match_a_brute_force_double_loop():
    s1, m1, s2, m2 = states()
    mod = mim()
    got = mod.group_scores(s1, m1, s2, m2)
    q, k = mod.w1(s1), mod.w2(s2)
    for i in range(N):
        for j in range(N):
            want = max(float(q[i, t] @ k[j, s]) for t in range(T) for s in range(T) if m1[i, t] and m2[j, s])
            assert math.isclose(float(got[i, j]), want, rel_tol=1e-5, abs_tol=1e-5)


def test_groups_are_per_user_but_the_code_compat_broadcast_makes_them_batch_global():
    s1, m1, s2, m2 = states()
    pair = mim(w12=False).group_scores(s1, m1, s2, m2)
    assert not all(torch.equal(pair[0], pair[i]) for i in range(1, N))
    compat = mim(w12=False, code_compat=True).group_scores(s1, m1, s2, m2)
    assert all(torch.equal(compat[0], compat[i]) for i in range(1, N))
    # the compat row is each sender's own self-similarity: entry [x, y] = max S1_y S2_y^T
    assert math.isclose(float(compat[2, 4]), float(pair[4, 4]), rel_tol=1e-6)


def test_shapes_threshold_limits_and_the_forced_self_message():
    s1, m1, s2, m2 = states(empty_other=(2,))
    out, mask = mim(k=math.inf, self_message="gate")(s1, m1, s2, m2)
    assert out.shape == (N, 2 * T, D) and mask.shape == (N, 2 * T)
    assert not mask[:, T:].any()  # k = +inf: no message at all
    a = mim(k=-math.inf).groups(mim(k=-math.inf).group_scores(s1, m1, s2, m2), m2)
    assert torch.equal(a[:, 2], torch.zeros(N)) and a[:, [0, 1, 3, 4]].eq(1).all()  # empty senders masked
    forced = mim(k=math.inf).groups(torch.full((N, N), -1.0), m2)
    assert torch.equal(forced, torch.diag(torch.tensor([1.0, 1, 0, 1, 1])))  # a_ii = 1 iff i has the other domain


def test_a_non_overlapping_user_changes_with_another_users_other_domain_sequence():
    s1, m1, s2, m2 = states(empty_other=(2,))
    mod = mim(k=-math.inf)
    before = mod(s1, m1, s2, m2)[0][2]
    s2b = s2.clone()
    s2b[0, 0] += 1.0
    after = mod(s1, m1, s2b, m2)[0][2]
    assert not torch.allclose(before, after)
    assert torch.equal(mod(s1, m1, s2, m2)[0][2, :T], mod(s1, m1, s2b, m2)[0][2, :T])  # own half unchanged


def test_gradients_reach_w_ip_w_c_w_f_and_w1_w2_through_the_straight_through_gate():
    s1, m1, s2, m2 = states()
    mod = MIM(D, k=0.5, score="cosine", aggregate="wc", n_users=8).train()
    out, mask = mod(s1, m1, s2, m2)
    (out * mask.unsqueeze(-1)).pow(2).sum().backward()
    for name in ("w_ip.weight", "w_c.weight", "w_f.weight", "w1.weight", "w2.weight"):
        assert dict(mod.named_parameters())[name].grad.abs().sum() > 0, name


def test_mean_aggregation_is_permutation_equivariant_and_wc_is_not():
    s1, m1, s2, m2 = states()
    perm = torch.tensor([3, 0, 4, 1, 2])
    for agg, equi in (("mean", True), ("wc", False)):
        mod = mim(aggregate=agg, k=-1.0, n_users=N)
        a, _ = mod(s1, m1, s2, m2)
        b, _ = mod(s1[perm], m1[perm], s2[perm], m2[perm])
        assert torch.allclose(a[perm], b, atol=1e-5) is equi


# ---- the program -----------------------------------------------------------------------------

DEFAULTS = dict(batch_size=32, epochs=2, patience=0, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)


def setup(**kw):
    rows = rows_from_logs(fixture_logs(), fixture_config())
    cat = {"cloth": np.arange(80), "sport": np.arange(1000, 1080)}
    model = Amid(AmidConfig(**{"d": 8, "max_len": 6, "layers": 1, "heads": 1, "dropout": 0.0, **kw}),
                 list(DOMAINS), cat)
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    rng = np.random.default_rng(0)
    main = {"O": model.make_batch(rows.O.slice(0, 32), rng), "P": model.make_batch(rows.D.slice(0, 32), rng)}
    batches = {"main": main, "dr": model.make_batch(rows.D.slice(32, 32), rng)}
    return model, ps, batches


def iterate(model, ps, opts, batch, step):
    st = next(s for ph in resolve_program(model, **DEFAULTS).phases for s in ph.steps if s.label == step)
    emb = pull_rows(ps, model.sparse_ids(batch))
    loss, named = pick_loss(model(batch, emb, step=step), st)
    opts.zero_grad()
    loss.backward()
    opt = opts[st.optimizer]
    push_grads(ps, {k: v for k, v in emb.items() if opt.spec.tables is None or k in opt.spec.tables})
    opt.step(world=1)
    return named


def test_alg1_program_and_stage_2_updates_theta_only():
    model, ps, batches = setup()
    prog = resolve_program(model, **DEFAULTS)
    assert [(s.optimizer, s.streams, s.epochs) for s in prog.phases[0].steps] == [("main", ("O", "P"), 1),
                                                                                 ("dr", ("D",), 1)]
    assert prog.optimizers["dr"].lr == 5e-6 and prog.optimizers["main"].lr == 5e-4
    opts = OptimizerSet(model, prog.optimizers)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    named = iterate(model, ps, opts, batches["main"], "main")
    assert {"pred", "imputation", "propensity", "loss"} <= set(named)
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.state_dict().items()
             if not torch.equal(v, start[k])}
    assert {"enc.0", "enc.1", "mim.0", "mim.1", "predict.0", "impute.0", "propensity.0"} <= moved  # stage 1: all
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = np.unique(model.sparse_ids(batches["dr"])[ITEM].numpy())
    rows0 = ps.pull(ITEM, ids).clone()
    main_state = {k: v["exp_avg"].clone() for k, v in enumerate(opts["main"].opt.state.values())}
    assert set(iterate(model, ps, opts, batches["dr"], "dr")) == {"debias"}
    after = model.state_dict()
    theta = [k for k in before if k.startswith(THETA)]
    assert theta and any(not torch.equal(before[k], after[k]) for k in theta)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(THETA))  # φ, ψ untouched
    assert any(k.startswith("impute.") for k in before) and any(k.startswith("propensity.") for k in before)
    assert torch.equal(ps.pull(ITEM, ids), rows0)  # the item table is frozen in stage 2
    assert all(torch.equal(v["exp_avg"], main_state[k]) for k, v in enumerate(opts["main"].opt.state.values()))


@pytest.mark.parametrize("mim_on, estimator, steps", [(False, "none", ["main"]), (True, "none", ["main"]),
                                                      (False, "ips", ["main", "dr"]), (True, "dr", ["main", "dr"])])
def test_baselines_run_in_the_same_harness(mim_on, estimator, steps):
    model, ps, batches = setup(mim=mim_on, estimator=estimator)
    prog = resolve_program(model, **DEFAULTS)
    assert [s.optimizer for s in prog.phases[0].steps] == steps
    opts = OptimizerSet(model, prog.optimizers)
    for st in steps:
        batch = batches[st] if estimator != "none" else batches["main"]["O"]
        named = iterate(model, ps, opts, batch, st)
        assert all(np.isfinite(float(v)) for v in named.values())
    scores = model._heads(batches["main"]["O"], pull_rows(ps, model.sparse_ids(batches["main"]["O"]))[ITEM])
    assert scores["logit"].shape == (32, 2)
    p = torch.sigmoid(scores["logit"])
    assert ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("k_u", [0.25, 0.75])
def test_the_propensity_head_calibrates_to_the_k_u_selection(k_u):
    """Spec A7: with the overlap flag in its input, BCE on o gives p̂ ≈ 1 (overlapping) and ≈ K_u."""
    model, _, _ = setup()
    torch.manual_seed(0)
    n = 1000
    x = torch.randn(n, 1, 2 * 8)
    ov = (torch.rand(n) < 0.3).float()
    o = torch.where(ov > 0, torch.ones(n), (torch.rand(n) < k_u).float())
    opt = torch.optim.Adam(model.propensity.parameters(), lr=0.02)
    for _ in range(150):
        logit = model.propensity(torch.cat([x, ov[:, None, None]], -1)).reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, o)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.sigmoid(model.propensity(torch.cat([x, ov[:, None, None]], -1)).reshape(-1)).detach()
    assert float(p[ov > 0].mean()) > 0.9
    assert abs(float(p[ov == 0].mean()) - k_u) < 0.06


@pytest.mark.parametrize("mim_on", [True, False])
def test_only_mim_makes_a_user_depend_on_another_users_other_domain(mim_on):
    model, ps, batches = setup(mim=mim_on, mim_k=-math.inf, estimator="none")
    model.eval()
    b = batches["main"]["O"]
    j = int(torch.nonzero((b["d2"] != -1).any(1))[0])  # a row with a domain-2 list
    i = int(torch.nonzero(((b["d2"] == -1).all(1)) & (b["dom"] == 0))[0])  # a domain-1-only user
    b2 = {k: v.clone() for k, v in b.items()}
    b2["d2"][j, 0] = 1079 if int(b["d2"][j, 0]) != 1079 else 1078
    with torch.no_grad():
        u = [model.represent(x, pull_rows(ps, model.sparse_ids(x))[ITEM])[i] for x in (b, b2)]
    assert (not torch.allclose(u[0], u[1])) is mim_on


@pytest.mark.parametrize("backbone, bidirectional", [("bert4rec", True), ("sasrec", False)])
def test_bert4rec_backbone_reads_both_directions_and_trains_in_the_amid_program(backbone, bidirectional):
    """BERT4Rec (spec §11-19: the pointwise head, no Cloze) sees later items at early positions,
    SASRec does not; AMID with BERT4Rec runs one phase epoch of Alg. 1 with finite losses."""
    from xdtrain.train.local_program import run_epochs

    model, ps, batches = setup(backbone=backbone, mim=True, estimator="dr")
    model.eval()
    b = batches["main"]["O"]
    i = int(torch.nonzero((b["d1"] != -1).sum(1) >= 3)[0])
    emb = pull_rows(ps, model.sparse_ids(b))[ITEM]
    x = model._embed(emb, b["d1"][i:i + 1])
    m = b["d1"][i:i + 1] != -1
    x2 = x.clone()
    x2[0, 2] = -x2[0, 2] + torch.linspace(0, 1, x.shape[-1])  # a later item (not a constant shift: LayerNorm)
    with torch.no_grad():
        h, h2 = model.enc[0](x, m), model.enc[0](x2, m)
    assert (not torch.allclose(h[0, 0], h2[0, 0])) is bidirectional
    assert not torch.allclose(h[0, 2], h2[0, 2])
    if not bidirectional:
        return
    rows = rows_from_logs(fixture_logs(), fixture_config())
    prog = resolve_program(model, **{**DEFAULTS, "epochs": 1})
    tables = {"O": rows.O.slice(0, 64), "D": rows.D.slice(0, 64)}  # two iterations per stage
    named = run_epochs(model, ps, prog, tables, np.random.default_rng(0))
    assert set(named) == {"debias"} and np.isfinite(named["debias"])
