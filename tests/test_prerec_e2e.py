"""PreRec end to end on a synthetic world (spec sec. 9.2, E1/E2), without the engine.

Five domains with planted domain shift (delta_k ~ N(0, sigma_d^2)), catalogues and traffic that differ
2-10x, and conformity (users favour items exposed a lot in the previous 15 days, strength gamma).
PreRec is pre-trained on three source domains with the plain contract loop (make_batch -> pull_rows
-> forward -> backward -> push_grads -> Adam) against an in-process `LocalPS`, then evaluated
zero-shot on the two held-out domains over their full catalogues. Item "text" is the world's
planted text vector x_j = A g_j + noise (A shared by all domains).

    .venv/bin/pytest -m slow tests/test_prerec_e2e.py -s     # prints the per-seed table
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from xdtrain.data.popularity import PopularityIndex
from xdtrain.data.sequences import build_sequences
from xdtrain.data.synthetic import (
    ChoiceConfig,
    DomainConfig,
    LatentConfig,
    UserConfig,
    WorldConfig,
    build_world,
    iter_blocks,
)
from xdtrain.data.synthetic.text import item_text
from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.evaluator import EvalConfig, evaluate
from xdtrain.models.prerec import PreRec, PreRecConfig
from xdtrain.models.prerec_data import domain_balanced_indices, eval_rows
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.text.cache import ItemVectors

SOURCES, TARGETS = ["src_a", "src_b", "src_c"], ["tgt_d", "tgt_e"]
SEEDS = [0, 1, 2]
METRICS = ["recall@5%", "rndcg@5%"]
BASE = PreRecConfig(d=32, heads=2, negatives=32, max_len=20)  # paper variant and popularity options


def make_world(seed: int, gamma: float, sigma_d: float = 1.0, n_users: int = 4000):
    """(interactions, text vectors) of a world like configs/world_small.yaml, built in memory."""
    cfg = WorldConfig(
        out="memory://unused", seed=seed, progress=False,
        domains=[DomainConfig("src_a", 600, 10.0), DomainConfig("src_b", 300, 4.0), DomainConfig("src_c", 150, 2.0),
                 DomainConfig("tgt_d", 400, 1.0), DomainConfig("tgt_e", 200, 1.0)],
        latent=LatentConfig(dim=8, domain_shift_sigma=sigma_d), users=UserConfig(n_users=n_users),
        choice=ChoiceConfig(gamma=gamma),
    )
    cfg.sequences.n_days = 90
    world = build_world(cfg)
    blocks = [b.interactions for b in iter_blocks(world)]
    it = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    names = np.array(world.domain_names, dtype=object)
    inter = pa.table({"user_id": it["user_id"], "item_id": it["item_id"], "domain": names[it["domain"]],
                      "timestamp": it["timestamp"]})
    vecs = {}
    for k, name in enumerate(world.domain_names):
        lo, hi = int(world.item_start[k]), int(world.item_start[k + 1])
        vecs[name] = (np.arange(lo, hi), item_text(world, k, lo, hi)[1])
    return inter, ItemVectors(vecs)


def pretrain_zero_shot(inter: pa.Table, text: ItemVectors, cfg: PreRecConfig, seed: int, steps: int = 300,
                       batch_rows: int = 32, lr: float = 1e-3) -> dict[str, float]:
    """Pre-train on SOURCES, return zero-shot metrics on TARGETS (mean over the two domains)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes = {d: len(text.catalogue(d)) for d in text.domains}
    pop = PopularityIndex.from_table(inter, cfg.pop, sizes) if cfg.use_popularity else None
    model = PreRec(cfg, SOURCES, text, pop)
    ps = LocalPS()
    for spec in model.sparse_tables():
        ps.create_table(spec)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    seqs = build_sequences(inter)
    src = seqs.filter(pc.is_in(seqs["domain"], pa.array(SOURCES)))
    doms = np.asarray(src["domain"].to_pylist(), dtype=object)
    for _ in range(steps):
        batch = model.make_batch(src.take(domain_balanced_indices(doms, batch_rows, rng)), rng)
        emb = pull_rows(ps, model.sparse_ids(batch))
        loss = model(batch, emb)
        opt.zero_grad()
        loss.backward()
        push_grads(ps, emb)
        opt.step()
    # Zero-shot: every target user's next-item samples; the target's own counts feed F (past days only).
    tgt = seqs.filter(pc.is_in(seqs["domain"], pa.array(TARGETS)))
    rows = eval_rows(tgt, cfg.max_len).sort_by([("domain", "ascending"), ("timestamp", "ascending")])
    data = EvalSet(rows, {d: text.catalogue(d) for d in TARGETS})
    result = evaluate(model.scorer(rows, ps.pull), data, EvalConfig(exclude_history=False, k_percents=[5.0]))
    return {m: result.summary()["domain_mean"]["all"][m] for m in METRICS}


def _compare(gamma: float, a: PreRecConfig, b: PreRecConfig, label: str) -> dict[str, np.ndarray]:
    """Per-seed differences a - b of the zero-shot metrics (printed as a table)."""
    diffs = {m: [] for m in METRICS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster on a shared 2-core machine
    try:
        runs = []
        for seed in SEEDS:
            inter, text = make_world(seed, gamma)
            runs.append((seed, pretrain_zero_shot(inter, text, a, seed), pretrain_zero_shot(inter, text, b, seed)))
    finally:
        torch.set_num_threads(threads)
    for seed, ra, rb in runs:
        print(f"{label} gamma={gamma} seed={seed} " + "  ".join(
            f"{m}: {ra[m]:.4f} vs {rb[m]:.4f} ({ra[m] - rb[m]:+.4f})" for m in METRICS))
        for m in METRICS:
            diffs[m].append(ra[m] - rb[m])
    return {m: np.array(v) for m, v in diffs.items()}


def _summary(d: np.ndarray) -> tuple[float, float]:
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


@pytest.mark.slow
def test_e1_prerec_beats_prerec_n_zero_shot_on_held_out_domains():
    """Domain shift + strong conformity (gamma = 4): debiased pre-training transfers better."""
    diffs = _compare(4.0, BASE, BASE.prerec_n(), "PreRec vs PreRec_n")
    for m, d in diffs.items():
        mean, se = _summary(d)
        print(f"  {m}: mean gain {mean:+.4f} +- {se:.4f} (SE)")
        assert (d > 0).all(), (m, d)
        assert mean > 2 * se, (m, mean, se)


@pytest.mark.slow
def test_e2_control_without_conformity():
    """gamma = 0: the popularity term must not hurt (spec E2 control). It is measured against PreRec
    without the popularity term; the printed table shows how much it still helps without conformity."""
    diffs = _compare(0.0, BASE, replace(BASE, use_popularity=False), "PreRec vs PreRec without popularity")
    for m, d in diffs.items():
        mean, se = _summary(d)
        print(f"  {m}: mean gain {mean:+.4f} +- {se:.4f} (SE)")
        assert mean > -2 * se, (m, mean, se)
