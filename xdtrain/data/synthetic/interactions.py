"""Users and their interaction sequences, simulated one block of users at a time.

Per user: a home domain (by traffic), overlapping or not, 1-3 preferred clusters with
mixture weights pi_u, and one taste vector z_u shared by every domain. In domain k the
taste is pref_uk = z_u + delta_k + noise. A (user, domain) sequence then unrolls step by
step, vectorised over all sequences of the block:

  cluster_t: stay with P = stickiness; otherwise uniform (P = explore) or drawn from pi_u
  item_t ~ softmax over the (domain, cluster_t) pool of
           beta_taste pref_uk . g_j + beta_markov ghat_{item_{t-1}} . g_j + gamma logpop_j(day_t)

Small pools (all <= exact_pool_max) use the exact softmax: Gumbel-max over the whole pool.
Large pools use a sampled softmax over n_candidates uniform draws from the pool. It keeps the
taste signal and the conformity effect but is less peaked than the exact one. The proposal
ignores popularity on purpose, so gamma = 0 stays a clean control: proposing by exposure
(importance-corrected) or always adding the pool's hottest items were both measured, and
with peaked tastes both over-picked hot items even at gamma = 0.
Each block has its own random stream, so a block's output depends only on (seed, block).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .latents import S_USERS, World, stream


@dataclass
class UserBlock:
    users: dict[str, np.ndarray]  # one row per user
    sequences: dict[str, np.ndarray]  # one row per (user, domain), ordered by user then domain
    interactions: dict[str, np.ndarray]  # one row per interaction, ordered by sequence then time


def n_blocks(world: World) -> int:
    us = world.cfg.users
    return -(-us.n_users // us.block_size)


_FORKED_WORLD: World | None = None  # set before forking workers, inherited by them


def _simulate_forked(block: int) -> UserBlock:
    return simulate_block(_FORKED_WORLD, block)


def iter_blocks(world: World, workers: int = 1) -> Iterator[UserBlock]:
    """All user blocks in order; with workers > 1 they are simulated in forked processes.

    Blocks are independent (one random stream each), so the output does not depend on
    `workers`. At most 2 x workers blocks are in flight, which keeps memory bounded.
    """
    if workers <= 1:
        for block in range(n_blocks(world)):
            yield simulate_block(world, block)
        return
    global _FORKED_WORLD
    _FORKED_WORLD = world
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for block in range(n_blocks(world)):
            pending.append(pool.submit(_simulate_forked, block))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    _FORKED_WORLD = None


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    """Gumbel noise as -log(Exp(1)): one log per draw (the ziggurat exponential is cheap)."""
    return -np.log(np.maximum(rng.standard_exponential(shape, dtype=np.float32), np.float32(1e-30)))


def _categorical(rng: np.random.Generator, cum: np.ndarray) -> np.ndarray:
    """One draw per row from rows of cumulative probabilities."""
    u = rng.random(len(cum))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), cum.shape[1] - 1)


def _lengths(world: World, rng, seq_domain, seq_overlap) -> tuple[np.ndarray, np.ndarray]:
    """Lognormal lengths per sequence, clipped per domain; also the standardised activity."""
    sq, us = world.cfg.sequences, world.cfg.users

    def per_domain(key: str) -> np.ndarray:  # the domain's override, else the global value
        own = [getattr(d, key) for d in world.cfg.domains]
        return np.array([getattr(sq, key) if v is None else v for v in own])[seq_domain]

    med = per_domain("len_median") * np.where(seq_overlap, 1.0, us.nonoverlap_len_scale)
    lo, hi = per_domain("len_min"), per_domain("len_max")
    z = rng.standard_normal(len(seq_domain))
    lengths = np.clip(np.rint(med * np.exp(sq.len_sigma * z)), lo, hi).astype(np.int64)
    return lengths, z


def _days(world: World, rng, lengths: np.ndarray) -> np.ndarray:
    """[R, Lmax] non-decreasing day of each step, inside [0, n_days)."""
    sq = world.cfg.sequences
    R, Lmax = len(lengths), int(lengths.max())
    gaps = rng.geometric(1.0 / (1.0 + sq.mean_gap_days), (R, Lmax)) - 1
    gaps[:, 0] = rng.integers(0, sq.n_days, R)
    days = np.cumsum(gaps, axis=1)
    over = np.maximum(days[np.arange(R), lengths - 1] - (sq.n_days - 1), 0)
    return np.clip(days - over[:, None], 0, sq.n_days - 1)


def simulate_block(world: World, block: int) -> UserBlock:
    cfg = world.cfg
    us, lat, ob = cfg.users, cfg.latent, cfg.observation
    K, C, L = len(cfg.domains), lat.n_clusters, lat.dim
    first, n = block * us.block_size, us.block_size  # always a whole block: see the end
    rng = stream(cfg, S_USERS, block)

    # Users: home domain by traffic; overlapping users add domains (by traffic, Gumbel top-k).
    home = rng.choice(K, size=n, p=world.traffic_share)
    overlap = (rng.random(n) < us.overlap_fraction) & (K >= 2)
    keys = np.log(world.traffic_share)[None, :] + rng.gumbel(size=(n, K))
    keys[np.arange(n), home] = np.inf
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    active = rank < np.where(overlap, min(us.overlap_domains, K), 1)[:, None]

    # Preferred clusters (uniform, without replacement) with Dirichlet(1) weights; shared taste.
    n_pref = rng.integers(us.pref_min, us.pref_max + 1, n)
    crank = np.argsort(np.argsort(rng.random((n, C)), axis=1), axis=1)
    pi = np.where(crank < n_pref[:, None], rng.exponential(1.0, (n, C)), 0.0)
    pi /= pi.sum(axis=1, keepdims=True)
    z = pi @ world.cluster_centres + lat.user_sigma * rng.standard_normal((n, L))

    # Sequences: one per active (user, domain), ordered by user then domain.
    seq_user, seq_domain = np.nonzero(active)
    R = len(seq_user)
    pref = z[seq_user] + world.delta[seq_domain] + lat.user_domain_sigma * rng.standard_normal((R, L))
    lengths, activity = _lengths(world, rng, seq_domain, overlap[seq_user])

    # MNAR observation of non-overlapping users: propensity rises with activity.
    logit = np.log(ob.base_rate / max(1.0 - ob.base_rate, 1e-12)) + ob.activity_slope * activity
    p_seq = np.clip(1.0 / (1.0 + np.exp(-logit)), ob.min_propensity, 1.0)
    propensity = np.ones(n)
    solo = ~overlap[seq_user]
    propensity[seq_user[solo]] = p_seq[solo]
    observed = rng.random(n) < propensity

    days = _days(world, rng, lengths)
    Lmax = days.shape[1]
    ts = np.sort(days * 86400 + rng.integers(0, 86400, days.shape), axis=1) + world.epoch0

    items, negs = _unroll(world, rng, pi[seq_user], pref, seq_domain, lengths, days)

    valid = np.arange(Lmax)[None, :] < lengths[:, None]
    uid = first + np.arange(n, dtype=np.int64)
    inter = _flatten(uid[seq_user], seq_domain, items, negs, ts, valid)
    n_inter = np.bincount(seq_user, weights=lengths, minlength=n).astype(np.int64)
    users = dict(user_id=uid, home_domain=home, is_overlapping=overlap, active=active, observed=observed,
                 propensity=propensity, n_interactions=n_inter, pi=pi, z=z)
    sequences = dict(user_id=uid[seq_user], domain=seq_domain, length=lengths, start_day=days[:, 0],
                     end_day=days[np.arange(R), lengths - 1], pref=pref)
    # The last block was simulated whole (so a smaller world is a prefix of a larger one): cut it.
    keep = us.n_users
    if first + n > keep:
        users = {k: v[: keep - first] for k, v in users.items()}
        sequences = {k: v[sequences["user_id"] < keep] for k, v in sequences.items()}
        inter = {k: v[inter["user_id"] < keep] for k, v in inter.items()}
    return UserBlock(users=users, sequences=sequences, interactions=inter)


def _unroll(world: World, rng, pi_seq, pref, seq_domain, lengths, days):
    """Simulate every sequence step by step; returns [R, Lmax] items and [R, Lmax, neg] negatives.

    Candidates are handled as pool-order indices (see latents.py): their latents, hotness and
    exposure slots come from plain offsets, and np.take keeps the gathers fast.
    """
    cfg, ch = world.cfg, world.cfg.choice
    C, R, Lmax = cfg.latent.n_clusters, len(lengths), days.shape[1]
    order = np.argsort(-lengths, kind="stable")  # active sequences at step t are a prefix
    n_active = np.searchsorted(-lengths[order], -np.arange(Lmax), side="right")
    pref, dom, days_o = pref[order].astype(np.float32), seq_domain[order], days[order]
    cum_pi = np.cumsum(pi_seq[order], axis=1)
    sizes = np.diff(world.pool_start)
    exact = int(sizes.max()) <= ch.exact_pool_max
    H = world.logpop.shape[1]
    logpop = world.logpop.ravel()

    items = np.full((R, Lmax), -1, dtype=np.int64)
    negs = np.full((R, Lmax, ch.negatives), -1, dtype=np.int64)
    cluster = _categorical(rng, cum_pi)
    prev = np.full(R, -1, dtype=np.int64)  # pool-order index of the previous item
    for t in range(Lmax):
        a = int(n_active[t])
        if t > 0:
            move = rng.random(a) >= ch.stickiness
            explore = rng.random(a) < ch.explore
            fresh = np.where(explore, rng.integers(0, C, a), _categorical(rng, cum_pi[:a]))
            cluster[:a] = np.where(move, fresh, cluster[:a])
        pool = dom[:a].astype(np.int64) * C + cluster[:a]
        size = sizes[pool][:, None]
        if exact:  # every item of the pool (padded to the largest pool)
            pos = np.broadcast_to(np.arange(int(sizes.max()))[None, :], (a, int(sizes.max())))
            score = np.where(pos < size, np.float32(0.0), np.float32(-np.inf))
            pos = np.minimum(pos, size - 1)
        else:  # sampled softmax: uniform draws from the pool, with replacement
            pos = np.minimum((rng.random((a, ch.n_candidates), dtype=np.float32) * size).astype(np.int64),
                             size - 1)
            score = np.zeros(pos.shape, dtype=np.float32)
        cand = world.pool_start[pool][:, None] + pos
        q = ch.beta_taste * pref[:a]
        if t > 0:
            q = q + ch.beta_markov * np.take(world.ghat_pool, prev[:a], axis=0)
        score += np.matmul(np.take(world.g_pool, cand, axis=0), q[:, :, None])[:, :, 0]
        if ch.gamma:
            n_hot = world.pool_hot[pool][:, None]
            base = (days_o[:a, t] * H + world.hot_start[pool])[:, None]
            pop = np.take(logpop, base + np.minimum(pos, np.maximum(n_hot - 1, 0)))
            score += ch.gamma * np.where(pos < n_hot, pop, np.float32(0.0))
        if t > 0 and not ch.allow_repeat:
            score[cand == prev[:a, None]] = -np.inf
        score += _gumbel(rng, score.shape)
        pick = np.argmax(score, axis=1)
        ok = np.isfinite(score[np.arange(a), pick])  # not ok: a one-item pool, so repeat it
        prev[:a] = np.where(ok, cand[np.arange(a), pick], prev[:a])
        items[:a, t] = world.pool_items[prev[:a]]
        if ch.negatives:
            start, n_items = world.item_start[dom[:a]][:, None], np.diff(world.item_start)[dom[:a]][:, None]
            off = rng.integers(0, n_items, (a, ch.negatives))
            off = np.where(start + off == items[:a, t, None], (off + 1) % n_items, off)
            negs[:a, t] = start + off
    inv = np.empty_like(order)
    inv[order] = np.arange(R)
    return items[inv], negs[inv]


def _flatten(seq_uid, seq_domain, items, negs, ts, valid) -> dict[str, np.ndarray]:
    """Rows in (sequence, step) order; with negatives each step is [click, negatives...]."""
    n_neg = negs.shape[2]
    if n_neg == 0:
        return dict(user_id=np.broadcast_to(seq_uid[:, None], items.shape)[valid], item_id=items[valid],
                    domain=np.broadcast_to(seq_domain[:, None], items.shape)[valid], timestamp=ts[valid],
                    label=np.ones(int(valid.sum()), dtype=np.int8))
    both = np.concatenate([items[:, :, None], negs], axis=2)  # [R, Lmax, 1 + n_neg]
    shape = both.shape
    label = np.zeros(shape, dtype=np.int8)
    label[:, :, 0] = 1
    v = np.broadcast_to(valid[:, :, None], shape)
    return dict(user_id=np.broadcast_to(seq_uid[:, None, None], shape)[v], item_id=both[v],
                domain=np.broadcast_to(seq_domain[:, None, None], shape)[v],
                timestamp=np.broadcast_to(ts[:, :, None], shape)[v], label=label[v])
