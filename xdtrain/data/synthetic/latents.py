"""The planted world: cluster/topic centres, domain shifts, item latents, the exposure process.

Everything here is held in memory while users are simulated. Memory bound:
  items:      ~110 bytes per item (latents in item order and in pool order, unit latents, ids)
  popularity: n_days x H x 12 bytes (+ 24 transient), H = sum_k min(n_items_k, popularity.hot_items)
              (daily exposures, window counts, conformity term; transient int64/float64 sums)
Candidate pools are the items of one (domain, cluster), p = k * C + c. In "pool order" each
pool is contiguous and starts with its hot items in slot order, so a position inside a pool
tells directly whether the item is hot and which exposure slot it has (no lookup per candidate).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .config import WorldConfig

# Random-stream ids: each purpose (and unit: domain, block) gets its own independent stream.
S_CENTRES, S_DOMAINS, S_ITEMS, S_TEXT, S_POP, S_USERS, S_ENTITIES, S_TRIPLETS, S_LINKS, S_FEATS = range(10)


def stream(cfg: WorldConfig, purpose: int, *unit: int) -> np.random.Generator:
    """The random stream for (seed, purpose, unit...): independent of every other stream."""
    return np.random.default_rng([cfg.seed, purpose, *unit])


@dataclass
class World:
    cfg: WorldConfig
    # clusters and topics
    cluster_centres: np.ndarray  # [C, L]
    topic_offsets: np.ndarray  # [Z, L]
    topic_cluster: np.ndarray  # [Z] cluster of each topic
    # domains
    domain_names: list[str]
    delta: np.ndarray  # [K, L] user-taste shift per domain
    item_shift: np.ndarray  # [K, L] item-space offset per domain
    traffic_share: np.ndarray  # [K]
    item_start: np.ndarray  # [K + 1] global item id ranges per domain
    topic_mix: np.ndarray  # [K, Z] topic shares of each catalogue
    # items (global id = index)
    item_topic: np.ndarray  # [N] int16
    item_cluster: np.ndarray  # [N] int16
    g: np.ndarray  # [N, L] float32 item latents
    hot: np.ndarray  # [N] bool: the item has an exposure process
    # pools, in pool order (index i = pool_start[p] + position)
    pool_items: np.ndarray  # [N] item id at each pool-order index
    pool_index: np.ndarray  # [N] pool-order index of each item id
    pool_start: np.ndarray  # [P + 1]
    pool_hot: np.ndarray  # [P] hot items at the head of each pool
    g_pool: np.ndarray  # [N, L] float32 latents in pool order
    ghat_pool: np.ndarray  # [N, L] float32 unit latents in pool order (Markov term)
    # exposure process; slot s = hot_start[p] + position, for position < pool_hot[p]
    hot_start: np.ndarray  # [P + 1]
    hot_items: np.ndarray  # [H] item id of each slot
    exposures: np.ndarray  # [D, H] int32 daily exposures
    window: np.ndarray  # [D, H] float32 exposures in the previous `window_days` days
    norm: np.ndarray  # [D, K] float64 normaliser s_2 per day and domain
    logpop: np.ndarray  # [D, H] float32 log(1 + window / norm): the conformity feature
    epoch0: int  # unix seconds of day 0

    @property
    def n_items(self) -> int:
        return int(self.item_start[-1])

    @property
    def n_pools(self) -> int:
        return len(self.pool_start) - 1


def build_world(cfg: WorldConfig) -> World:
    lat = cfg.latent
    C, Z, L, K = lat.n_clusters, cfg.n_topics, lat.dim, len(cfg.domains)
    rng = stream(cfg, S_CENTRES)
    centres = rng.normal(0.0, lat.cluster_scale, (C, L))
    topic_offsets = rng.normal(0.0, lat.topic_scale, (Z, L))
    topic_cluster = np.arange(Z) // lat.topics_per_cluster

    rng = stream(cfg, S_DOMAINS)
    delta = rng.normal(0.0, lat.domain_shift_sigma, (K, L))
    item_shift = rng.normal(0.0, lat.item_shift_sigma, (K, L))
    topic_mix = rng.dirichlet(np.full(Z, lat.topic_concentration), size=K)
    traffic = np.array([d.traffic for d in cfg.domains], dtype=np.float64)
    sizes = np.array([d.n_items for d in cfg.domains], dtype=np.int64)
    item_start = np.concatenate([[0], np.cumsum(sizes)])

    # Items: topic (every topic present in every domain), latent around the topic centre.
    topics, latents = [], []
    for k in range(K):
        r = stream(cfg, S_ITEMS, k)
        t = r.choice(Z, size=sizes[k], p=topic_mix[k])
        t[:Z] = r.permutation(Z)  # guarantees a non-empty pool for every (domain, cluster)
        topics.append(t.astype(np.int16))
        noise = r.standard_normal((sizes[k], L))
        latents.append(centres[topic_cluster[t]] + topic_offsets[t] + lat.item_sigma * noise + item_shift[k])
    item_topic = np.concatenate(topics)
    item_cluster = topic_cluster[item_topic].astype(np.int16)
    g = np.concatenate(latents).astype(np.float32)
    pool = np.repeat(np.arange(K), sizes) * C + item_cluster

    # Hot items (fixed per domain) and the pool order: pool, then hot first, then id.
    hot = np.zeros(len(g), dtype=bool)
    for k in range(K):
        H = int(min(sizes[k], cfg.popularity.hot_items))
        hot[item_start[k] + stream(cfg, S_POP, k).choice(sizes[k], size=H, replace=False)] = True
    pool_items = np.lexsort((np.arange(len(g)), ~hot, pool)).astype(np.int64)
    pool_index = np.empty_like(pool_items)
    pool_index[pool_items] = np.arange(len(g))
    P = K * C
    pool_start = np.concatenate([[0], np.cumsum(np.bincount(pool, minlength=P))])
    pool_hot = np.bincount(pool[hot], minlength=P)
    hot_start = np.concatenate([[0], np.cumsum(pool_hot)])
    hot_items = pool_items[hot[pool_items]]  # slot order = pool order restricted to hot items
    g_pool = g[pool_items]
    ghat_pool = g_pool / np.maximum(np.linalg.norm(g_pool, axis=1, keepdims=True), 1e-9)

    start = datetime.strptime(cfg.sequences.start_date, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return World(
        cfg=cfg, cluster_centres=centres, topic_offsets=topic_offsets, topic_cluster=topic_cluster,
        domain_names=[d.name for d in cfg.domains], delta=delta, item_shift=item_shift,
        traffic_share=traffic / traffic.sum(), item_start=item_start, topic_mix=topic_mix,
        item_topic=item_topic, item_cluster=item_cluster, g=g, hot=hot, pool_items=pool_items,
        pool_index=pool_index, pool_start=pool_start, pool_hot=pool_hot, g_pool=g_pool,
        ghat_pool=ghat_pool.astype(np.float32), hot_start=hot_start, hot_items=hot_items,
        epoch0=int(start.timestamp()), **_exposure_process(cfg, sizes, item_start, hot_items, traffic),
    )


def _exposure_process(cfg: WorldConfig, sizes, item_start, hot_items, traffic) -> dict:
    """Per domain: hotness h(d) = ar h(d-1) + noise (AR(1)); exposures(d) ~ Poisson(T_k softmax(h(d)))."""
    pc, D, K = cfg.popularity, cfg.sequences.n_days, len(sizes)
    slot_domain = np.searchsorted(item_start, hot_items, side="right") - 1
    exposures = np.zeros((D, len(hot_items)), dtype=np.int32)
    volume = pc.daily_exposures * traffic / traffic.mean()
    innov = pc.hot_sigma * np.sqrt(1.0 - pc.ar**2)  # keeps the stationary std at hot_sigma
    for k in range(K):
        cols = np.nonzero(slot_domain == k)[0]
        r = stream(cfg, S_POP, k, 1)
        h = np.empty((D, len(cols)))
        h[0] = r.normal(0.0, pc.hot_sigma, len(cols))
        steps = r.normal(0.0, innov, (D, len(cols)))
        for d in range(1, D):
            h[d] = pc.ar * h[d - 1] + steps[d]
        p = np.exp(h - h.max(axis=1, keepdims=True))
        exposures[:, cols] = r.poisson(volume[k] * p / p.sum(axis=1, keepdims=True))

    # Window counts over the previous days only (day d itself excluded; day 0 has none).
    cs = np.zeros((D + 1, len(hot_items)), dtype=np.int64)
    np.cumsum(exposures, axis=0, out=cs[1:])
    lo = np.maximum(np.arange(D) - pc.window_days, 0)
    window = (cs[np.arange(D)] - cs[lo]).astype(np.float32)
    del cs

    sq = window.astype(np.float64) ** 2
    norm = np.zeros((D, K))
    for k in range(K):
        m = slot_domain == k
        if pc.normaliser == "catalogue":  # the paper's s_2: RMS over the whole catalogue
            norm[:, k] = np.sqrt(sq[:, m].sum(axis=1) / sizes[k])
        else:  # the released code's: RMS over items with a non-zero count
            norm[:, k] = np.sqrt(sq[:, m].sum(axis=1) / np.maximum((window[:, m] > 0).sum(axis=1), 1))
    s = norm[:, slot_domain]
    logpop = np.where(s > 0, np.log1p(window / np.where(s > 0, s, 1.0)), 0.0).astype(np.float32)
    return dict(exposures=exposures, window=window, norm=norm, logpop=logpop)
