"""A semi-synthetic open-world two-domain world (AMID spec §10.2-F): canonical interaction logs.

K latent interest clusters (the general confounder GC) shared by both domains: each domain's items
are split evenly over the clusters. A user has an interest mixture π_u ~ Dirichlet(alpha); with
`aligned` both domains draw from the same π_u, else (the control) the second domain draws from an
independent π'_u. A sequence is a sticky Markov chain over clusters (stay with `stay`, else jump to
a cluster drawn from the mixture), an item uniform within the cluster (Zipf-like with `item_skew`),
and with probability `noise` a uniformly random item of the domain instead (domain-specific
behaviour, SC^Z).
A share `overlap` of the users has long sequences in both domains; the others have a short
sequence in one domain (chosen uniformly).

Optional trends (`periods` > 0): users fall into `periods` consecutive blocks of user ids (the time
of their latest interaction); each period has a trending cluster (the same index in both domains),
and each of the last `trend_items` items of a user's domain lists comes from it with probability
`trend`. A user's period then shows in its own last items and in those of the other users of its
period, e.g. the other domain's histories seen in the same MIM group. In the control the second
domain's trend is that of an independent random period of each user: it says nothing of the
user's period.

    inter = open_world(OpenWorld(aligned=True, seed=0))   # user_id, item_id, domain, timestamp
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class OpenWorld:
    domains: tuple[str, str] = ("d1", "d2")
    users: int = 2000
    overlap: float = 0.15  # share of users with history in both domains
    clusters: int = 8
    items_per_cluster: int | tuple[int, int] = 15  # per domain (one value: both)
    alpha: float = 0.2  # Dirichlet concentration of π_u (small: one or two dominant interests)
    stay: float = 0.6  # probability the chain keeps its cluster
    noise: float = 0.2  # probability of a uniformly random item of the domain
    item_skew: float = 0.0  # item k of a cluster drawn ∝ (k + 1)^-item_skew (0: uniform; > 0 popular heads)
    len_overlap: tuple[int, int] = (10, 20)  # sequence length ranges (inclusive)
    len_single: tuple[int, int] = (5, 8)
    single_share: float = 0.5  # probability that a one-domain user's domain is the first
    aligned: bool = True  # False: the domains' mixtures are independent (the control world)
    periods: int = 0  # > 0: time periods with a trending cluster each (see the module docstring)
    trend: float = 0.0  # probability that one of a domain list's last items is from its period's trending cluster
    trend_items: int = 1  # how many of a list's last items the trend reaches
    seed: int = 0


def period_of(cfg: OpenWorld, user_id: np.ndarray) -> np.ndarray:
    """Each user's period (0 .. periods - 1; consecutive blocks of user ids); 0 without periods."""
    u = np.asarray(user_id, dtype=np.int64)
    return (u - 1) * max(cfg.periods, 1) // cfg.users


def trending_clusters(cfg: OpenWorld) -> np.ndarray:
    """[periods] each period's trending cluster (the same index in both domains)."""
    rng = np.random.default_rng([cfg.seed, 7])  # apart from the main draws: periods=0 keeps the world
    return rng.integers(cfg.clusters, size=cfg.periods)


def per_cluster(cfg: OpenWorld, domain: int) -> int:
    """Items per cluster in `domain` (0 or 1)."""
    ipc = cfg.items_per_cluster
    return int(ipc if isinstance(ipc, int) else ipc[domain])


def item_ids(cfg: OpenWorld, domain: int) -> np.ndarray:
    """Domain `domain`'s item ids (domain 1 from 1, domain 2 from 100001), cluster-major: item k of
    cluster c is id base + c * per_cluster + k."""
    return np.arange(cfg.clusters * per_cluster(cfg, domain), dtype=np.int64) + (1 if domain == 0 else 100_001)


def cluster_of(cfg: OpenWorld, item: np.ndarray) -> np.ndarray:
    item = np.asarray(item, dtype=np.int64)
    second = item > 100_000
    return np.where(second, (item - 100_001) // per_cluster(cfg, 1), (item - 1) // per_cluster(cfg, 0))


def _sequence(rng: np.random.Generator, cfg: OpenWorld, pi: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    ipc = len(ids) // cfg.clusters
    w = np.arange(1, ipc + 1, dtype=np.float64) ** -cfg.item_skew
    w /= w.sum()
    out = np.empty(n, dtype=np.int64)
    c = int(rng.choice(cfg.clusters, p=pi))
    for t in range(n):
        if t and rng.random() >= cfg.stay:
            c = int(rng.choice(cfg.clusters, p=pi))
        if rng.random() < cfg.noise:
            out[t] = ids[rng.integers(len(ids))]
        else:
            out[t] = ids[c * ipc + (rng.choice(ipc, p=w) if cfg.item_skew else rng.integers(ipc))]
    return out


def open_world(cfg: OpenWorld) -> pa.Table:
    """Canonical interactions (user_id from 1, item_id, domain, timestamp = position, domain 1 first)."""
    rng = np.random.default_rng(cfg.seed)
    ids = [item_ids(cfg, 0), item_ids(cfg, 1)]
    trending, trend_rng = trending_clusters(cfg), np.random.default_rng([cfg.seed, 8])
    cols: dict[str, list] = {"user_id": [], "item_id": [], "domain": [], "timestamp": []}
    for u in range(1, cfg.users + 1):
        pi = rng.dirichlet(np.full(cfg.clusters, cfg.alpha))
        pis = [pi, pi if cfg.aligned else rng.dirichlet(np.full(cfg.clusters, cfg.alpha))]
        both = rng.random() < cfg.overlap
        doms = [0, 1] if both else [0 if rng.random() < cfg.single_share else 1]
        lo, hi = cfg.len_overlap if both else cfg.len_single
        t = 0
        for z in doms:
            seq = _sequence(rng, cfg, pis[z], ids[z], int(rng.integers(lo, hi + 1)))
            if cfg.periods:
                p = period_of(cfg, u) if cfg.aligned or z == 0 else trend_rng.integers(cfg.periods)
                ipc = len(ids[z]) // cfg.clusters
                for k in range(max(len(seq) - cfg.trend_items, 0), len(seq)):
                    if trend_rng.random() < cfg.trend:
                        seq[k] = ids[z][trending[p] * ipc + trend_rng.integers(ipc)]
            cols["user_id"] += [u] * len(seq)
            cols["item_id"] += seq.tolist()
            cols["domain"] += [cfg.domains[z]] * len(seq)
            cols["timestamp"] += list(range(t, t + len(seq)))
            t += len(seq)
    return pa.table({"user_id": pa.array(cols["user_id"], pa.int64()), "item_id": pa.array(cols["item_id"], pa.int64()),
                     "domain": pa.array(cols["domain"], pa.string()),
                     "timestamp": pa.array(cols["timestamp"], pa.int64())})
