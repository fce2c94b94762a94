"""RecGURU without Ray (spec sec. 9, tests 2-14 and 17): tensors, modules, losses, the adversarial
alternation, the l2 tie, CDSRec, the three-phase program and its optimizers, the variants."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from test_programs import DEFAULTS, iterate
from torch import nn

from xdtrain.data.recipes import InteractionsSource, LocalRecipe, RecipeConfig
from xdtrain.data.synthetic.two_domain import TwoDomainWorld, two_domain_world
from xdtrain.eval.candidates import prepare_candidates
from xdtrain.eval.evaluator import EvalConfig, evaluate
from xdtrain.models.recguru import OVERLAP, TARGET, RecGuru, RecGuruConfig
from xdtrain.models.recguru_data import EOS_ID, recommendation_tensors
from xdtrain.nn.losses import gradient_penalty, mean_negative_bce, sampled_softmax_loss
from xdtrain.nn.program import resolve_program
from xdtrain.nn.sparse import PAD_ID, Rows, pull_rows
from xdtrain.ps import LocalPS
from xdtrain.train.optimizers import OptimizerSet, schedule_factor

SMALL = dict(d=16, max_len=12, layers=1, ffn=32, batch_size=16, neg_softmax=5, pretrain_steps=4, adv_iterations=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    inter, _ = two_domain_world(TwoDomainWorld(users_a=40, users_b=80, overlap=0.25, items_a=30, items_b=50,
                                               len_a=(4, 8), len_b=(6, 14)))
    out = LocalRecipe().prepare(InteractionsSource("w", inter), RecipeConfig(
        name="leave_one_out_domain", streams=["by_domain", "overlap"]), tmp_path_factory.mktemp("rg"))
    tables = {k: pads.dataset(v.url).to_table() for k, v in out.streams.items()}
    return inter, out, tables


def build(world, seed: int = 0, **kw) -> tuple[RecGuru, LocalPS, OptimizerSet]:
    _, out, tables = world
    torch.manual_seed(seed)
    model = RecGuru(RecGuruConfig(**{**SMALL, **kw}), dict(out.valid.catalogue),
                    {k: t.num_rows for k, t in tables.items()}, seed)
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    return model, ps, OptimizerSet(model, resolve_program(model, **DEFAULTS).optimizers)


def batch_of(model: RecGuru, world, streams: tuple[str, ...], n: int = 16, seed: int = 0) -> dict:
    _, _, tables = world
    rng = np.random.default_rng(seed)
    spec = model.streams()
    out = {s: model.make_batch(tables[spec[s].dataset].slice(0, n), rng, stream=s) for s in streams}
    return out[streams[0]] if len(streams) == 1 else out


def snap(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefix)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rows_of(model: RecGuru, ps: LocalPS, k: int, ids: torch.Tensor) -> Rows:
    uniq = np.unique(ids[ids >= 0].numpy())
    return Rows(uniq, ps.pull(model.table(k), uniq).clone().requires_grad_(True))


# ---- test 2: split and tensors -------------------------------------------------------------------

def test_batches_shift_pad_and_end_with_eos(world):
    model, _, _ = build(world)
    b = batch_of(model, world, ("d0",), n=4)
    seqs = [np.asarray(s)[-12:] for s in world[2]["domain.a"]["items"].to_pylist()[:4]]
    for i, s in enumerate(seqs):
        L = len(s)
        assert b["enc"][i, :L].tolist() == s.tolist() and int(b["enc"][i, L]) == EOS_ID
        assert (b["enc"][i, L + 1:] == PAD_ID).all()
        assert b["dec_out"][i, :L].tolist() == s.tolist()
        assert b["dec_in"][i, 0] == EOS_ID and b["dec_in"][i, 1:L].tolist() == s[:-1].tolist()
        assert (b["dec_out"][i, L:] == PAD_ID).all()
        assert not np.isin(b["rec_neg"][i, :L].numpy(), s).any()  # never the user's own items


def test_no_test_or_valid_target_reaches_a_training_tensor(world):
    inter, out, _ = world
    model, _, _ = build(world, job="all")
    held = {(u, d): {int(i)} for rows in (out.valid.rows, out.test.rows)
            for u, d, i in zip(rows["user_id"].to_pylist(), rows["domain"].to_pylist(), rows["item_id"].to_pylist())}
    for u, d, i in zip(out.valid.rows["user_id"].to_pylist(), out.valid.rows["domain"].to_pylist(),
                       out.valid.rows["item_id"].to_pylist()):
        held[(u, d)].add(int(i))
    for stream in ("d0", "d1", TARGET):
        dom = model.domains[model.t if stream == TARGET else int(stream[1])]
        table = world[2][model.streams()[stream].dataset]
        b = model.make_batch(table, np.random.default_rng(0), stream=stream)
        for i, (u, seq) in enumerate(zip(table["user_id"].to_pylist(), table["items"].to_pylist())):
            used = {int(v) for k, t in b.items() if isinstance(t, torch.Tensor) and t.dtype == torch.int64
                    and k not in ("cut", "rec_neg", "bpr_neg") for v in t[i].reshape(-1).tolist()} - {EOS_ID, PAD_ID}
            assert used <= set(seq), (stream, u)  # built from the train sequence only ...
            assert not used & (held.get((u, dom), set()) - set(seq)), (stream, u)  # ... never a held-out target
    # the test input is train + valid of the target's domain: the scorer reads only that domain
    test = out.test.rows
    hist = test["history"].to_pylist()[0]
    dom = test["domain"].to_pylist()[0]
    own = [h for h, d in zip(hist, test["history_domains"].to_pylist()[0]) if d == dom]
    assert own[-1] == [i for u, d, i in zip(out.valid.rows["user_id"].to_pylist(), out.valid.rows["domain"].to_pylist(),
                                            out.valid.rows["item_id"].to_pylist())
                       if u == test["user_id"].to_pylist()[0] and d == dom][0]


# ---- tests 3-5: tables, encoder, decoders --------------------------------------------------------

def test_per_domain_tables_and_tied_output(world):
    model, ps, _ = build(world, job="all", phase3_add_recon=True)
    assert [t.name for t in model.sparse_tables()] == ["item.a", "item.b"]
    assert model.emb["pos0"].shape == (13, 16) and model.emb["eos1"].shape == (16,)
    b = batch_of(model, world, (TARGET,))
    emb = pull_rows(ps, model.sparse_ids(b))
    rows = emb["item.a"]
    h = model.encode(0, b["enc"], rows)
    model.reconstruction(0, b, h, rows).backward(retain_graph=True)
    g_rec = rows.weight.grad.clone()
    rows.weight.grad = None
    model.recommendation(b, rows).backward()
    assert g_rec.abs().sum() > 0 and rows.weight.grad.abs().sum() > 0  # one tensor feeds both outputs
    assert set(emb) == {"item.a"}


def test_one_shared_bidirectional_encoder(world):
    model, ps, _ = build(world)
    model.eval()
    enc = torch.tensor([[1, 2, 3, EOS_ID, PAD_ID], [4, 5, EOS_ID, PAD_ID, PAD_ID]])
    rows = rows_of(model, ps, 0, enc)
    h = model.encode(0, enc, rows)
    assert h.shape == (2, 16)
    padded = torch.cat([enc, torch.full((2, 3), PAD_ID)], 1)
    torch.testing.assert_close(model.encode(0, padded, rows), h)
    for t in range(3):  # every item reaches h, including the oldest (no causal mask)
        other = enc.clone()
        other[0, t] = 7
        assert not torch.allclose(model.encode(0, other, rows_of(model, ps, 0, other))[0], h[0])
    assert not any(n.startswith(("encoder.0", "encoder.1")) and "dec" in n for n, _ in model.named_parameters())
    assert len(model.encoder) == 1  # A and B go through this one module list


def test_decoders_are_causal_per_domain_and_read_h(world):
    model, ps, _ = build(world)
    model.eval()
    x = torch.tensor([[EOS_ID, 1, 2, 3]])
    rows = rows_of(model, ps, 0, torch.tensor([1, 2, 3, 9]))
    h = torch.randn(1, 16)
    o = model.dec[0](model.embed(0, x, rows), h)
    y = x.clone()
    y[0, 3] = 9
    o2 = model.dec[0](model.embed(0, y, rows), h)
    torch.testing.assert_close(o2[0, :3], o[0, :3])
    o3 = model.dec[0](model.embed(0, x, rows), h + 1)
    assert all(not torch.allclose(o3[0, t], o[0, t]) for t in range(4))
    assert not {id(p) for p in model.dec[0].parameters()} & {id(p) for p in model.dec[1].parameters()}


# ---- tests 6, 7, 11: losses ----------------------------------------------------------------------

def test_sampled_softmax_with_every_other_item_is_the_full_softmax():
    torch.manual_seed(0)
    o, table = torch.randn(6, 8), torch.randn(10, 8)
    target = torch.tensor([0, 3, 9, 2, 2, 5])
    others = torch.stack([torch.tensor([j for j in range(10) if j != t]) for t in target.tolist()])
    pos = (o * table[target]).sum(-1)
    neg = torch.einsum("nd,nkd->nk", o, table[others])
    torch.testing.assert_close(sampled_softmax_loss(pos, neg), F.cross_entropy(o @ table.T, target),
                               rtol=0, atol=1e-6)


def test_pad_positions_add_nothing_to_reconstruction(world):
    model, ps, _ = build(world)
    model.eval()
    b = batch_of(model, world, ("d0",), n=4)
    emb = pull_rows(ps, model.sparse_ids(b))
    h = model.encode(0, b["enc"], emb["item.a"])
    base = model.reconstruction(0, b, h, emb["item.a"])
    wider = {k: (torch.cat([v, torch.full((v.shape[0], 2, *v.shape[2:]), PAD_ID)], 1)
                 if k in ("dec_in", "dec_out", "rec_neg") else v) for k, v in b.items()}
    torch.testing.assert_close(model.reconstruction(0, wider, h, emb["item.a"]), base)


def test_eq12_on_a_hand_computed_example():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.5, -1.5]])  # mean negative logit -0.5
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = -np.log(sig(1.0)) - np.log(1 - sig(-0.5))
    assert float(mean_negative_bce(pos, neg)) == pytest.approx(expected, abs=1e-6)
    assert float(mean_negative_bce(pos, neg, pairwise=True)) == pytest.approx(-np.log(sig(1.5)), abs=1e-6)


def test_discriminator_shapes_and_linear_critic_gp(world):
    model, _, _ = build(world)
    shapes = [tuple(p.shape) for n, p in model.disc.named_parameters() if n.endswith("weight")]
    assert shapes == [(128, 16), (128, 128), (128, 128), (1, 128)]
    critic = nn.Linear(16, 1)
    ha, hb, eps = torch.randn(5, 16), torch.randn(7, 16), torch.rand(7, 1)
    w = critic.weight.detach()
    assert float(gradient_penalty(critic, ha, hb, eps)) == pytest.approx(float((w.norm() - 1) ** 2), rel=1e-5)


# ---- test 8: the alternation ---------------------------------------------------------------------

def test_critic_frozen_in_the_generator_step_and_generator_frozen_in_the_critic_step(world):
    model, ps, opts = build(world)
    b = batch_of(model, world, ("d1", "d0", OVERLAP))
    ids = {t: np.unique(v.numpy()) for t, v in model.sparse_ids(b).items()}
    rows0 = {t: ps.pull(t, i).clone() for t, i in ids.items()}
    gen0, disc0 = snap(model, ("emb.", "encoder.", "dec.")), snap(model, "disc.")
    named = iterate(model, ps, opts, {k: b[k] for k in ("d1", "d0")}, "critic")
    assert {"critic", "gp", "w", "loss"} <= set(named)
    assert same(snap(model, ("emb.", "encoder.", "dec.")), gen0)
    assert all(torch.equal(ps.pull(t, i), rows0[t]) for t, i in ids.items())
    assert not same(snap(model, "disc."), disc0)
    disc1 = snap(model, "disc.")
    named = iterate(model, ps, opts, b, "gen")
    assert {"rec0", "rec1", "w", "l2", "loss"} <= set(named)
    assert same(snap(model, "disc."), disc1)
    assert not same(snap(model, ("emb.", "encoder.", "dec.")), gen0)
    assert any(not torch.equal(ps.pull(t, i), rows0[t]) for t, i in ids.items())


def test_one_generator_step_lowers_the_critics_separation(world):
    model, ps, opts = build(world, w_rec=0.0, w_l2=0.0, dropout=0.0, disc_dropout=0.0, adv_lr=1e-3)
    b = batch_of(model, world, ("d1", "d0"))

    def separation() -> float:
        with torch.no_grad():
            emb = pull_rows(ps, model.sparse_ids(b), requires_grad=False)
            return float(model(b, emb, step="gen")["w"])

    for _ in range(20):  # a critic that separates the domains
        iterate(model, ps, opts, b, "critic")
    before = separation()
    iterate(model, ps, opts, b, "gen")
    assert separation() < before


# ---- test 9: the l2 tie --------------------------------------------------------------------------

def test_l2_value_by_hand(world):
    model, _, _ = build(world)
    ha, hb = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    model.encode = lambda k, enc, rows: ha if k == 0 else hb
    assert float(model.l2_tie({"enc0": None, "enc1": None}, {})) == pytest.approx((5 + 1) / 2)


def overlap_distance(model: RecGuru, ps: LocalPS, b: dict) -> float:
    model.eval()
    with torch.no_grad():
        emb = pull_rows(ps, model.sparse_ids({OVERLAP: b}), requires_grad=False)
        out = model.l2_tie(b, emb)
    model.train()
    return float(out)


def test_l2_tie_shrinks_overlapped_users_distance(world):
    dist = {}
    for w_l2 in (0.0, 1.0):
        model, ps, opts = build(world, w_l2=w_l2, w_adv=0.0, adv_lr=3e-3, dropout=0.0)
        b = batch_of(model, world, ("d1", "d0", OVERLAP))
        for _ in range(15):
            iterate(model, ps, opts, b, "gen")
        dist[w_l2] = overlap_distance(model, ps, b[OVERLAP])
    assert dist[1.0] <= 0.7 * dist[0.0]


def test_zero_overlap_drops_the_overlap_stream_and_the_term(world):
    _, out, tables = world
    model = RecGuru(RecGuruConfig(**SMALL), dict(out.valid.catalogue),
                    {k: t.num_rows for k, t in tables.items() if k != OVERLAP})
    prog = resolve_program(model, **DEFAULTS)
    assert OVERLAP not in prog.streams
    assert prog.phases[1].steps[1].streams == model._pair()


# ---- test 10: CDSRec -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cut", "last"])
def test_the_training_gur_never_holds_a_supervised_target(mode):
    seqs = [np.arange(1, n + 1) * 10 for n in (2, 5, 9)]
    from xdtrain.models.recguru_data import DomainIndex

    t = recommendation_tensors(seqs, DomainIndex(np.arange(1, 100) * 10), 2, mode, np.random.default_rng(1),
                               torch.Generator().manual_seed(0))
    for i, s in enumerate(seqs):
        gur = set(t["gur"][i][t["gur"][i] >= 0].tolist())
        targets = set(t["rec_out"][i][t["rec_sup"][i]].tolist())
        assert targets and not gur & targets
        if mode == "last":
            assert targets == {int(s[-1])}


def test_cdsrec_is_causal_scores_with_the_tied_table_and_bpr_leaves_the_encoder(world):
    model, ps, opts = build(world, job="finetune")
    model.eval()
    x = torch.tensor([[1, 2, 3, 4]])
    rows = rows_of(model, ps, 0, x)
    h = torch.randn(1, 16)
    q = model.rec[0](model.embed(0, x, rows), h)
    y = x.clone()
    y[0, 3] = 5
    torch.testing.assert_close(model.rec[0](model.embed(0, y, rows_of(model, ps, 0, y)), h)[0, :3], q[0, :3])
    model.train()
    enc0 = snap(model, ("encoder.", "dec.", "disc."))
    b = batch_of(model, world, (TARGET,))
    iterate(model, ps, opts, b, "ft")
    assert same(snap(model, ("encoder.", "dec.", "disc.")), enc0)


# ---- test 12: the program ------------------------------------------------------------------------

def test_phases_and_optimizers_as_in_the_paper(world):
    model, _, _ = build(world, job="all", pretrain_steps=400)
    prog = resolve_program(model, **DEFAULTS)
    assert [p.name for p in prog.phases] == ["pretrain", "adversarial", "finetune"]
    assert [(s.label, s.repeat) for s in prog.phases[1].steps] == [("critic", 5), ("gen", 1)]
    o = prog.optimizers
    assert (o["pre"].lr, o["pre"].betas, o["pre"].schedule, o["pre"].warmup_steps) == (1.0, (0.9, 0.98), "noam", 200)
    assert (o["critic"].lr, o["critic"].betas, o["critic"].tables) == (1e-4, (0.5, 0.9), ())
    assert (o["gen"].lr, o["gen"].betas) == (1e-4, (0.5, 0.9))
    assert (o["ft"].lr, o["ft"].betas, o["ft"].tables) == (1e-3, (0.9, 0.9), ("item.a",))
    w, d = 200, 16
    for step in (1, w, 4 * w):
        assert schedule_factor(o["pre"], step - 1) == pytest.approx(d ** -0.5 * min(step ** -0.5, step * w ** -1.5))
    sets = OptimizerSet(model, prog.optimizers)
    shared = {n for n in sets["pre"].param_names} & {n for n in sets["gen"].param_names}
    assert shared and not shared & set(sets["critic"].param_names)


def test_finetune_targets_take_their_own_table_and_stream(world):
    for target in ("a", "b"):
        model, _, _ = build(world, job="finetune", target=target)
        prog = resolve_program(model, **DEFAULTS)
        assert [p.name for p in prog.phases] == ["finetune"]
        assert prog.streams[TARGET].dataset == f"domain.{target}" and set(prog.streams) == {TARGET}
        assert prog.optimizers["ft"].tables == (f"item.{target}",)


# ---- tests 13, 14, 17: evaluation, variants, determinism ------------------------------------------

def train_and_eval(world, seed: int = 0, **kw) -> dict:
    model, ps, opts = build(world, seed=seed, job="all", **kw)
    prog = resolve_program(model, **DEFAULTS)
    for i, ph in enumerate(prog.phases):
        for st in ph.steps:
            for r in range(st.repeat):
                iterate(model, ps, opts, batch_of(model, world, st.streams, seed=i * 10 + r), st.label)
    test = world[1].test
    out = {}
    for mode in ("uniform:10", "full"):
        cfg = EvalConfig(candidates=mode, tie_policy="pessimistic", ks=[5, 10, 20])
        res = evaluate(model.scorer(test.rows, ps.pull), test, cfg, prepare_candidates(test, cfg.spec()))
        out[mode] = res.summary()["overall"]["all"]
    return out


@pytest.mark.parametrize("variant", ["recguru", "autorec", "seqrec"])
def test_each_variant_trains_and_evaluates(world, variant):
    out = train_and_eval(world, variant=variant)
    for mode in ("uniform:10", "full"):
        assert {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)} <= set(out[mode])
        assert 0.0 <= out[mode]["hr@10"] <= 1.0


def test_determinism(world):
    assert train_and_eval(world, seed=3) == train_and_eval(world, seed=3)


def test_a_constant_scorer_gets_no_credit_under_pessimistic_ties(world):
    test = world[1].test
    cfg = EvalConfig(candidates="uniform:10", tie_policy="pessimistic", ks=[10])
    res = evaluate(lambda users, items, domain: torch.zeros(items.shape if items.dim() == 2 else
                                                            (len(users["row"]), len(items))),
                   test, cfg, prepare_candidates(test, cfg.spec()))
    assert res.summary()["overall"]["all"]["hr@10"] == 0.0


def test_both_targets_fine_tune_from_one_phase2_checkpoint(world, tmp_path):
    from xdtrain.train import checkpointing as ck
    from xdtrain.train.config import TransferConfig
    from xdtrain.train.transfer import transfer_dense, transfer_ps

    model, ps, opts = build(world, job="pretrain")
    b = batch_of(model, world, ("d1", "d0", OVERLAP))
    for step in ("pre", "critic", "gen"):
        iterate(model, ps, opts, b if step == "gen" else {k: b[k] for k in ("d1", "d0")}, step)
    d = tmp_path / "checkpoint_000000003_a000"
    ck.save_rank0(d, ck.EngineState(step=3), model, opts)
    ps.checkpoint(ck.ps_url(d))
    saved = model.state_dict()
    for target in ("a", "b"):
        torch.manual_seed(9)
        ft, ft_ps, ft_opts = build(world, seed=9, job="finetune", target=target)
        report = transfer_dense(d, ft, ft_opts, TransferConfig())
        assert not report["dense"].new and not report["dense"].dropped
        assert all(torch.equal(v, saved[k]) for k, v in ft.state_dict().items())
        ft_ps = LocalPS(2)
        transfer_ps(ft_ps, ck.ps_url(d), ft.sparse_tables(), TransferConfig())
        ids = np.unique(model.sparse_ids(b)[f"item.{target}"].numpy())
        assert torch.equal(ft_ps.pull(f"item.{target}", ids), ps.pull(f"item.{target}", ids))


def test_a_target_only_finetune_needs_only_the_targets_catalogue(world):
    from xdtrain.config import ConfigError

    _, out, _ = world
    cat = {"a": out.valid.catalogue["a"]}
    RecGuru(RecGuruConfig(**SMALL, job="finetune", domains=["a", "b"], target="a"), cat)
    with pytest.raises(ConfigError, match=r"model.domains: \['b'\] not in the data's domains \['a'\]"):
        RecGuru(RecGuruConfig(**SMALL, job="pretrain", domains=["a", "b"]), cat)
