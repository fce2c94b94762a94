"""PreRec model: the spec's unit tests T5, T7-T10, and the engine contract (training = serving logits).

T1/T2 (r-NDCG@K%, K rounding) are in tests/test_metrics.py; T3/T4 in tests/test_popularity.py;
T6 and T11 in tests/test_prerec_data.py.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from xdtrain.config import ConfigError, from_dict, read_yaml
from xdtrain.data.popularity import PopFactorsConfig, PopularityIndex
from xdtrain.data.sequences import build_sequences
from xdtrain.models.prerec import OFFSETS, PreRec, PreRecConfig
from xdtrain.models.prerec_data import eval_rows, offset_keys
from xdtrain.nn.program import StreamSpec, resolve_program
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.text.cache import ItemVectors

DAY = 86400
DOMAINS = {"a": np.arange(0, 30), "b": np.arange(100, 120), "t": np.arange(200, 225)}


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    n = 1500
    dom = rng.choice(list(DOMAINS), n)
    items = np.array([rng.choice(DOMAINS[d]) for d in dom])
    inter = pa.table({"user_id": rng.integers(0, 120, n), "item_id": items, "domain": dom,
                      "timestamp": rng.integers(0, 40 * DAY, n)})
    text = ItemVectors({d: (ids, rng.normal(size=(len(ids), 12))) for d, ids in DOMAINS.items()})
    sizes = {d: len(ids) for d, ids in DOMAINS.items()}
    code = PopFactorsConfig(alignment="sliding", normaliser="nonzero", widen_empty=True)
    pops = {str(c): PopularityIndex.from_table(inter, c, sizes) for c in (PopFactorsConfig(), code)}
    return inter, build_sequences(inter), text, pops


def _model(world, variant="paper", domains=("a", "b"), **kw) -> PreRec:
    inter, _, text, pops = world
    cfg = PreRecConfig(variant=variant, d=16, heads=2, negatives=8, max_len=6, dropout=0.0, **kw)
    torch.manual_seed(0)
    return PreRec(cfg, list(domains), text, pops[str(cfg.pop)])


def _ps(model: PreRec) -> LocalPS:
    ps = LocalPS()
    for spec in model.sparse_tables():
        ps.create_table(spec)
    return ps


def _rows(world, domains=("a", "b")) -> pa.Table:
    seqs = world[1]
    return seqs.filter(pa.compute.is_in(seqs["domain"], pa.array(list(domains))))


def _train(model: PreRec, ps: LocalPS, rows: pa.Table, steps: int = 5) -> None:
    rng = np.random.default_rng(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        b = model.make_batch(rows.take(rng.choice(rows.num_rows, 16)), rng)
        emb = pull_rows(ps, model.sparse_ids(b))
        loss = model(b, emb)
        opt.zero_grad()
        loss.backward()
        push_grads(ps, emb)
        opt.step()


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_t5_causal_encoder_ignores_later_items_and_padding(world, variant):
    model = _model(world, variant).eval()
    g = torch.Generator().manual_seed(0)
    m, eps = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g) * 0.1
    hist = torch.randint(0, 40, (3, 6), generator=g)
    lens = torch.tensor([6, 4, 2])
    mask = torch.arange(6)[None, :] < lens[:, None]
    dom = torch.tensor([0, 1, 0])
    with torch.no_grad():
        base = model.user_states(m, eps, hist, mask, dom, model.D)
        later = hist.clone()
        later[:, 3:] = torch.randint(0, 40, (3, 3), generator=g)  # change items after position 2
        states = model.user_states(m, eps, later, mask, dom, model.D)
        torch.testing.assert_close(states[:, :3], base[:, :3])
        assert not torch.allclose(states[0, 3:], base[0, 3:])  # ... which do see them
        padded = model.user_states(m, eps, hist[2:, :2], mask[2:, :2], dom[2:], model.D)  # no padding at all
        torch.testing.assert_close(padded[0], base[2, :2])


def test_t7_domain_logit_term_cancels_in_the_softmax(world):
    """D_k W_d (and D_k inside V_j) add a constant per row: logits shift, the loss does not (Eq. 8)."""
    model = _model(world)
    ps = _ps(model)
    b = model.make_batch(_rows(world), np.random.default_rng(0))
    with torch.no_grad():
        model.D.normal_()
        emb = pull_rows(ps, model.sparse_ids(b))
        loss1 = model(b, emb)
        m = model.f_nn(b["text"])
        u = model.user_states(m, None, b["hist"], b["mask"], b["dom"], model.D)[b["tmask"]]
        l1 = model.logits(u, m, None, b["neg"], b["tdom"], model.D, b["pop_neg"])
        model.W_d.normal_(std=3.0)
        l2 = model.logits(u, m, None, b["neg"], b["tdom"], model.D, b["pop_neg"])
        loss2 = model(b, emb)
    shift = l2 - l1
    assert shift.abs().max() > 0.1
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # constant over the items of a row
    torch.testing.assert_close(loss1, loss2)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_t8_zero_shot_ignores_d_and_offsets_but_fine_tuned_uses_them(world, variant):
    model = _model(world, variant, domains=("a", "b", "t"))
    ps = _ps(model)
    _train(model, ps, _rows(world, ("a", "b", "t")))
    ev = eval_rows(_rows(world, ("t",)), 6)
    users = {"row": torch.arange(8), "history": _pad(ev["history"].to_pylist()[:8]),
             "history_len": torch.tensor([len(h) for h in ev["history"].to_pylist()[:8]]),
             "timestamp": torch.tensor(ev["timestamp"].to_pylist()[:8])}
    items = torch.as_tensor(DOMAINS["t"])
    zs = replace(model.cfg, inference="zero_shot")

    def scores(cfg) -> torch.Tensor:
        model.cfg = cfg
        return model.scorer(ev, ps.pull)(users, items, domain="t")

    z1, f1 = scores(zs), scores(replace(zs, inference="auto"))
    with torch.no_grad():
        model.D.normal_()  # randomise D and every offset row
    ps = _random_offsets(model)
    z2, f2 = scores(zs), scores(replace(zs, inference="auto"))
    assert torch.equal(z1, z2)  # bit-identical
    assert not torch.allclose(f1, f2)  # the fine-tuned domain reads D_t and its offsets
    model.cfg = replace(zs, inference="auto")


def _random_offsets(model: PreRec) -> LocalPS:
    """A PS whose offset rows are all random (init N(0, 1)) instead of trained."""
    ps = LocalPS()
    ps.create_table(replace(model.sparse_tables()[0], init="normal", init_scale=1.0, seed=7))
    return ps


def _pad(lists: list[list[int]]) -> torch.Tensor:
    w = max(len(x) for x in lists)
    return torch.tensor([x + [-1] * (w - len(x)) for x in lists])


def test_t9_transfer_keeps_shared_weights_and_starts_target_bias_at_zero(world):
    src = _model(world)
    ps = _ps(src)
    _train(src, ps, _rows(world))
    with torch.no_grad():
        src.D.normal_()
    tgt = PreRec.transfer(src, ["t"])
    s_src, s_tgt = src.state_dict(), tgt.state_dict()
    assert set(s_src) == set(s_tgt)
    for k in s_src:
        if k != "D":
            assert torch.equal(s_src[k], s_tgt[k]), k
    assert tgt.D.shape == (1, 16) and (tgt.D == 0).all()
    # target offsets: new PS ids, zero rows, however trained the source rows are
    src_keys = np.concatenate([offset_keys(d, DOMAINS[d]) for d in ("a", "b")])
    assert ps.pull(OFFSETS, src_keys).abs().sum() > 0
    tgt_keys = offset_keys("t", DOMAINS["t"])
    assert not np.isin(tgt_keys, src_keys).any()
    assert (ps.pull(OFFSETS, tgt_keys) == 0).all()
    assert len(np.unique(np.concatenate([offset_keys("a", [5]), offset_keys("b", [5])]))) == 2


def test_t10_offset_and_domain_priors_are_l2(world):
    model = _model(world)
    ps = _random_offsets(model)  # non-zero offsets
    b = model.make_batch(_rows(world), np.random.default_rng(0))
    with torch.no_grad():
        model.D.normal_()

    def loss_and_grads(cfg):
        model.cfg = cfg
        model.zero_grad()
        emb = pull_rows(ps, model.sparse_ids(b))
        loss = model(b, emb)
        loss.backward()
        return loss.detach(), emb[OFFSETS].weight.grad.clone(), model.D.grad.clone(), emb[OFFSETS].weight.detach()

    cfg = model.cfg
    l1, ge1, gd1, w = loss_and_grads(cfg)
    l0, ge0, gd0, _ = loss_and_grads(replace(cfg, lambda_v=0.0, lambda_d=0.0))
    torch.testing.assert_close(l1 - l0, 0.5 * cfg.lambda_v * w.pow(2).sum() + 0.5 * cfg.lambda_d * model.D.pow(2).sum())
    torch.testing.assert_close(ge1 - ge0, cfg.lambda_v * w)  # gradient lambda_v * eps (coupled L2)
    torch.testing.assert_close(gd1 - gd0, cfg.lambda_d * model.D.detach())
    # offsets at their prior mean (lambda_v -> infinity) == the model without offsets
    model.cfg = cfg
    ps2 = LocalPS()
    ps2.create_table(model.sparse_tables()[0])
    with_zero = model(b, pull_rows(ps2, model.sparse_ids(b)))
    model.cfg = replace(cfg, use_offsets=False)
    torch.testing.assert_close(with_zero, model(b, {}))
    model.cfg = cfg


@pytest.mark.parametrize("variant,inference", [("paper", "auto"), ("code", "auto"), ("paper", "zero_shot")])
def test_serving_scores_equal_training_logits(world, variant, inference):
    """The scorer (full catalogue, eval rows) computes exactly the logits the loss was trained on."""
    model = _model(world, variant, inference=inference)
    ps = _ps(model)
    _train(model, ps, _rows(world))
    model.eval()
    seq = _rows(world, ("b",)).slice(3, 1)
    assert len(seq["items"][0]) >= 3
    b = model.make_batch(seq, np.random.default_rng(5))
    known = inference == "auto"
    with torch.no_grad():
        m = model.f_nn(b["text"])
        eps = pull_rows(ps, model.sparse_ids(b), requires_grad=False)[OFFSETS](b["key"]) if known else None
        D = model.D if known else None
        u = model.user_states(m, eps, b["hist"], b["mask"], b["dom"], D)[b["tmask"]]
        want = model.logits(u, m, eps, b["neg"], b["tdom"], D, b["pop_neg"])[-1]
    ev = eval_rows(seq, model.cfg.max_len)
    ev = ev.slice(ev.num_rows - 1)
    users = {"row": torch.tensor([0]), "history": torch.tensor(ev["history"].to_pylist()),
             "history_len": torch.tensor([len(ev["history"][0])]),
             "timestamp": torch.tensor(ev["timestamp"].to_pylist())}
    ids = _raw_ids(b, b["neg"][-1], world[2])  # the last target's negatives, as raw item ids
    got = model.scorer(ev, ps.pull)(users, torch.as_tensor(ids), domain="b")[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _raw_ids(b, idx: torch.Tensor, text: ItemVectors) -> np.ndarray:
    """Raw item ids of batch-table indices, recovered through the (unique) text vectors of domain 'b'."""
    cat, vecs = text.catalogue("b"), torch.from_numpy(text.vectors("b"))
    hit = (b["text"][idx][:, None, :] == vecs[None, :, :]).all(-1)
    assert (hit.sum(1) == 1).all()
    return cat[hit.float().argmax(1).numpy()]


def test_contract_shapes_and_prerec_n(world):
    full = _model(world)
    b = full.make_batch(_rows(world), np.random.default_rng(0))
    N = int(b["tmask"].sum())
    assert b["neg"].shape == (N, 8) and b["pop_neg"].shape == (N, 8, 4) and b["target"].shape == (N,)
    assert full.sparse_ids(b)[OFFSETS].shape == b["key"].shape and len(full.sparse_tables()) == 1
    n = _model(world, **{"use_domain": False, "use_popularity": False, "use_offsets": False})
    assert n.cfg == full.cfg.prerec_n()
    bn = n.make_batch(_rows(world), np.random.default_rng(0))
    assert "pop_pos" not in bn and n.sparse_tables() == [] and n.sparse_ids(bn) == {}
    loss = n(bn, {})
    loss.backward()
    assert n.D.grad is None or (n.D.grad == 0).all()
    with pytest.raises(Exception, match="not among the model's domains"):
        full.make_batch(_rows(world, ("t",)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="popularity index built with"):
        PreRec(replace(full.cfg, pop=PopFactorsConfig(alignment="sliding")), ["a"], world[2], full.popularity)
    with pytest.raises(ValueError, match="divisible"):
        PreRecConfig(d=10, heads=3)


@pytest.mark.parametrize("name", ["prerec_pretrain", "prerec_code", "prerec_n"])
def test_yaml_model_sections_load(name):
    cfg = from_dict(PreRecConfig, read_yaml(f"configs/{name}.yaml")["model"], f"configs/{name}.yaml", "model.")
    assert cfg.d == 256 and cfg.negatives == 255 and cfg.max_len == 64
    assert cfg.balanced  # spec sec. 2.6
    if name == "prerec_n":
        assert not (cfg.use_domain or cfg.use_popularity or cfg.use_offsets)
    if name == "prerec_code":
        assert cfg.variant == "code" and cfg.pop.alignment == "sliding" and cfg.pop.normaliser == "nonzero"


def test_empty_history_reads_the_domain_prior(world):
    """Eq. 3's dummy item: a user with no history gets the state of D_k alone (paper variant)."""
    model = _model(world)
    ps = _ps(model)
    _train(model, ps, _rows(world))
    with torch.no_grad():
        model.D.normal_()
    model.eval()
    ev = eval_rows(_rows(world, ("b",)), 6).slice(0, 2)
    users = {"row": torch.tensor([0, 1]), "history": torch.tensor([[-1], [ev["history"][1][0].as_py()]]),
             "history_len": torch.tensor([0, 1]), "timestamp": torch.tensor(ev["timestamp"].to_pylist())}
    items = torch.as_tensor(DOMAINS["b"])
    scores = model.scorer(ev, ps.pull)(users, items, domain="b")
    with torch.no_grad():
        dom = torch.tensor([1])
        u0 = model.user_states(torch.zeros(1, 16), None, torch.zeros(1, 1, dtype=torch.long),
                               torch.zeros(1, 1, dtype=torch.bool), dom, model.D, with_prior=True)[0, 0]
        m = model.f_nn(torch.from_numpy(world[2].vectors("b")))
        eps = ps.pull(OFFSETS, offset_keys("b", DOMAINS["b"]))
        day = np.full(len(items), int(ev["timestamp"][0].as_py()) // DAY)
        F = torch.from_numpy(model.popularity.factors("b", DOMAINS["b"], day))
        want = model.logits(u0.expand(len(items), 16), m, eps, torch.arange(len(items)), dom.expand(len(items)),
                            model.D, F)
    torch.testing.assert_close(scores[0], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0], scores[1])


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_exported_vectors_rank_as_the_scorer_without_popularity(world, variant):
    """export(): U_i . V_j from the exported tables is the scorer's logit up to a per-domain constant
    (D_k W_d) when the popularity term is off; items of every domain are exported, keyed by domain."""
    from xdtrain.eval.evaluator import user_batch
    from xdtrain.eval.exported import export_scorer

    model = _model(world, variant, use_popularity=False)
    ps = _ps(model)
    _train(model, ps, _rows(world))
    ev = eval_rows(_rows(world), 6, last_only=True)
    tables = model.export(ps.pull, ev)
    assert set(tables["item"]["domain"].to_pylist()) == {"a", "b", "t"}
    assert tables["user"].num_rows == ev.num_rows
    mine, theirs = export_scorer(tables["user"], tables["item"]), model.scorer(ev, ps.pull)
    doms = np.asarray(ev["domain"].to_pylist())
    for d in ("a", "b"):
        users = user_batch(ev, np.flatnonzero(doms == d))
        items = torch.as_tensor(DOMAINS[d])
        gap = theirs(users, items, domain=d) - mine(users, items, domain=d)
        torch.testing.assert_close(gap, gap[:1, :1].expand_as(gap), atol=1e-5, rtol=0)


def test_balanced_training_draws_single_domain_rows(world):
    """Spec sec. 2.6 on the engine: `balanced` (the default) reads the recipe's (user, domain) rows
    through the domain-balanced sampler; those rows give the same batch as per-user rows split here."""
    from xdtrain.train.config import EngineConfig
    from xdtrain.train.engine import check_program

    bal, plain = _model(world), _model(world, balanced=False)
    assert bal.cfg.balanced and bal.streams() == {"train": StreamSpec("train_by_domain", sampler="domain_balanced")}
    assert plain.streams() == {"train": StreamSpec()}
    prog = resolve_program(bal, batch_size=8, epochs=1, patience=0, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    assert prog.streams["train"].sampler == "domain_balanced" and prog.streams["train"].batch_size == 8
    check_program(EngineConfig(), bal, SimpleNamespace(streams={"train": "u1", "train_by_domain": "u2"}))
    with pytest.raises(ConfigError, match="data.streams: .* reads dataset 'train_by_domain'.*add 'train_by_domain'"):
        check_program(EngineConfig(), bal, SimpleNamespace(streams={"train": "u1"}))
    check_program(EngineConfig(), plain, SimpleNamespace(streams={"train": "u1"}))
    inter = world[0].filter(pa.compute.is_in(world[0]["domain"], pa.array(["a", "b"])))
    per_user = build_sequences(inter, extra_columns=["domain"], by_domain=False)
    one, two = (bal.make_batch(r, np.random.default_rng(3)) for r in (_rows(world), per_user))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
