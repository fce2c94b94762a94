"""Shared kit of the PreRec synthetic spec tests (E1-E6, spec sec. 9.2): small planted worlds,
training with the plain contract loop against an in-process `LocalPS`, zero-shot scoring on the
held-out targets, and per-seed paired comparisons.

Five domains (three sources, two targets) with planted taste shift delta_k ~ N(0, sigma_d^2), an
optional item-space shift per domain (`item_shift`: the whole catalogue's latents move by
s_k ~ N(0, item_shift^2), the cross-domain confounder D can absorb), catalogues (150-600 items)
and traffic that differ 2-10x, and conformity of strength gamma. Item "text" is the planted
x_j = A g_j + noise (A shared by all domains). Trained models are cached per (world, config, seed)
for the whole pytest session: torch is seeded before the model is built, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from xdtrain.data.popularity import PopularityIndex
from xdtrain.data.sampler import domain_balanced_indices
from xdtrain.data.sequences import build_sequences
from xdtrain.data.synthetic import (
    ChoiceConfig,
    DomainConfig,
    LatentConfig,
    UserConfig,
    World,
    WorldConfig,
    build_world,
    iter_blocks,
)
from xdtrain.data.synthetic.text import item_text
from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.evaluator import EvalConfig, Scorer, evaluate
from xdtrain.models.prerec import PreRec, PreRecConfig
from xdtrain.models.prerec_data import eval_rows
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.text.cache import ItemVectors

SOURCES, TARGETS = ["src_a", "src_b", "src_c"], ["tgt_d", "tgt_e"]
SEEDS = [0, 1, 2]
METRICS = ["recall@5%", "rndcg@5%"]
BASE = PreRecConfig(d=32, heads=2, negatives=32, max_len=20)  # paper variant and popularity options
CONFORMITY = 4.0  # gamma of the worlds with conformity (E1, E2a-c, E3)


@dataclass
class Planted:
    """A generated world in memory: its latents, interactions, sequences, text vectors, and per user
    the cluster mixture pi (row = user id) and per (user, domain) sequence the taste pref."""

    world: World
    inter: pa.Table  # user_id, item_id, domain, timestamp
    seqs: pa.Table  # build_sequences(inter)
    text: ItemVectors
    pi: np.ndarray  # [n_users, C]
    pref: dict[tuple[int, str], np.ndarray]  # (user_id, domain) -> [L]


@lru_cache(maxsize=12)
def make_world(seed: int, gamma: float, sigma_d: float = 1.0, n_users: int = 4000, target_traffic: float = 1.0,
               item_shift: float = 0.0) -> Planted:
    """A world like configs/world_small.yaml (90 days), built in memory."""
    cfg = WorldConfig(
        out="memory://unused", seed=seed, progress=False,
        domains=[DomainConfig("src_a", 600, 10.0), DomainConfig("src_b", 300, 4.0), DomainConfig("src_c", 150, 2.0),
                 DomainConfig("tgt_d", 400, target_traffic), DomainConfig("tgt_e", 200, target_traffic)],
        latent=LatentConfig(dim=8, domain_shift_sigma=sigma_d, item_shift_sigma=item_shift),
        users=UserConfig(n_users=n_users), choice=ChoiceConfig(gamma=gamma),
    )
    cfg.sequences.n_days = 90
    world = build_world(cfg)
    blocks = list(iter_blocks(world))
    it = {k: np.concatenate([b.interactions[k] for b in blocks]) for k in blocks[0].interactions}
    names = np.array(world.domain_names, dtype=object)
    inter = pa.table({"user_id": it["user_id"], "item_id": it["item_id"], "domain": names[it["domain"]],
                      "timestamp": it["timestamp"]})
    vecs = {}
    for k, name in enumerate(world.domain_names):
        lo, hi = int(world.item_start[k]), int(world.item_start[k + 1])
        vecs[name] = (np.arange(lo, hi), item_text(world, k, lo, hi)[1])
    pi = np.concatenate([b.users["pi"] for b in blocks])
    pref = {(int(u), str(names[k])): p for b in blocks
            for u, k, p in zip(b.sequences["user_id"], b.sequences["domain"], b.sequences["pref"], strict=True)}
    return Planted(world, inter, build_sequences(inter), ItemVectors(vecs), pi, pref)


def in_domains(seqs: pa.Table, domains: Sequence[str]) -> pa.Table:
    return seqs.filter(pc.is_in(seqs["domain"], pa.array(list(domains))))


def new_model(w: Planted, cfg: PreRecConfig, domains: Sequence[str], seed: int) -> tuple[PreRec, LocalPS]:
    """A fresh PreRec (torch seeded first, so the initial weights depend on the seed only) and its PS."""
    torch.manual_seed(seed)
    sizes = {d: len(w.text.catalogue(d)) for d in w.text.domains}
    pop = PopularityIndex.from_table(w.inter, cfg.pop, sizes) if cfg.use_popularity else None
    model = PreRec(cfg, domains, w.text, pop)
    return model, with_ps(model)


def with_ps(model: PreRec) -> LocalPS:
    ps = LocalPS()
    for spec in model.sparse_tables():
        ps.create_table(spec)
    return ps


def fit(model: PreRec, ps: LocalPS, seqs: pa.Table, seed: int, steps: int = 300, batch_rows: int = 32,
        lr: float = 1e-3) -> None:
    """`steps` domain-balanced batches of `seqs` through make_batch -> pull -> forward -> push -> Adam."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    doms = np.asarray(seqs["domain"].to_pylist(), dtype=object)
    model.train()
    for _ in range(steps):
        batch = model.make_batch(seqs.take(domain_balanced_indices(doms, batch_rows, rng)), rng)
        emb = pull_rows(ps, model.sparse_ids(batch))
        loss = model(batch, emb)
        opt.zero_grad()
        loss.backward()
        push_grads(ps, emb)
        opt.step()


def target_rows(seqs: pa.Table, max_len: int, domains: Sequence[str] = TARGETS) -> pa.Table:
    """Every next-item sample of the domains' sequences, sorted by (domain, time)."""
    rows = eval_rows(in_domains(seqs, domains), max_len)
    return rows.sort_by([("domain", "ascending"), ("timestamp", "ascending")])


def evaluate_rows(scorer: Scorer, rows: pa.Table, text: ItemVectors) -> dict[str, float]:
    """Recall@5% and r-NDCG@5% over each domain's full catalogue, mean over the rows' domains."""
    doms = sorted(set(rows["domain"].to_pylist()))
    data = EvalSet(rows, {d: text.catalogue(d) for d in doms})
    result = evaluate(scorer, data, EvalConfig(exclude_history=False, k_percents=[5.0]))
    return {m: result.summary()["domain_mean"]["all"][m] for m in METRICS}


@dataclass
class Run:
    metrics: dict[str, float]  # zero-shot on TARGETS, mean over the two domains
    model: PreRec
    rows: pa.Table  # the target eval rows


def pretrain_zero_shot(w: Planted, cfg: PreRecConfig, seed: int, steps: int = 300) -> Run:
    """Pre-train on SOURCES, evaluate zero-shot on TARGETS (their own counts feed F, past days only)."""
    model, ps = new_model(w, cfg, SOURCES, seed)
    fit(model, ps, in_domains(w.seqs, SOURCES), seed, steps)
    rows = target_rows(w.seqs, cfg.max_len)
    return Run(evaluate_rows(model.scorer(rows, ps.pull), rows, w.text), model, rows)


_CACHE: dict[tuple, object] = {}


def cached(key: tuple, make: Callable[[], object]) -> object:
    """make() once per key and session; small matmuls run on one thread (faster on a shared 2-core box)."""
    if key not in _CACHE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _CACHE[key] = make()
        finally:
            torch.set_num_threads(threads)
    return _CACHE[key]


def trained(gamma: float, cfg: PreRecConfig, seed: int, **world: float) -> Run:
    """`pretrain_zero_shot` on the world (seed, gamma, **world), once per session."""
    key = ("zero_shot", gamma, repr(cfg), seed, tuple(sorted(world.items())))
    return cached(key, lambda: pretrain_zero_shot(make_world(seed, gamma, **world), cfg, seed))


def compare(gamma: float, a: PreRecConfig, b: PreRecConfig, label: str, **world: float) -> dict[str, np.ndarray]:
    """Per-seed differences a - b of the zero-shot metrics (printed as a table)."""
    return paired({s: trained(gamma, a, s, **world).metrics for s in SEEDS},
                  {s: trained(gamma, b, s, **world).metrics for s in SEEDS}, f"{label} gamma={gamma} {world or ''}")


def paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], label: str) -> dict[str, np.ndarray]:
    """Per-seed differences a - b of each metric, printed with both values and the mean +- SE."""
    diffs = {m: np.array([a[s][m] - b[s][m] for s in SEEDS]) for m in METRICS}
    for s in SEEDS:
        print(f"{label} seed={s} " + "  ".join(
            f"{m}: {a[s][m]:.4f} vs {b[s][m]:.4f} ({a[s][m] - b[s][m]:+.4f})" for m in METRICS))
    for m, d in diffs.items():
        mean, se = summary(d)
        print(f"  {label} {m}: mean difference {mean:+.4f} +- {se:.4f} (SE)")
    return diffs


def summary(d: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def no_domain(cfg: PreRecConfig) -> PreRecConfig:
    """The same PreRec without the cross-domain confounder D (popularity and offsets kept)."""
    return replace(cfg, use_domain=False)
