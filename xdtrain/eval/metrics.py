"""Ranking and classification metrics, vectorized in torch.

Every ranking metric is computed from *rank counts*, not from sorted lists, so the same code
serves a [B, C] candidate matrix and a 10^6-item catalogue counted chunk by chunk:

    greater[b, p]   valid candidates scoring strictly higher than positive p of row b
    tied[b, p]      other valid candidates scoring exactly as p (positives included)
    tied_pos[b, p]  positives of row b scoring exactly as p, p included (>= 1)

Ties. Positive p occupies one of the positions greater+1 .. greater+tied+1 (its "tied block").
A metric that is a sum of per-position gains f(r) (HR, NDCG, MRR, r-NDCG, rank) is resolved by
the tie policy:

    pessimistic  every tied negative ranks above the positives (the positives of a block take
                 its last positions);
    optimistic   the positives take the first positions of the block;
    average      the expected value when ties are broken uniformly at random: the mean of f
                 over the block (what PreRec's code does).

With F(n) = sum_{r=1..n} f(r), positive p with g = greater, t = tied, m = tied_pos gets
    optimistic  (F(g+m) - F(g)) / m
    pessimistic (F(g+t+1) - F(g+t+1-m)) / m
    average     (F(g+t+1) - F(g)) / (t+1)
For one positive per row (m = 1) these are f(g+1), f(g+t+1) and the block mean. With every score
tied the rank is C (pessimistic), 1 (optimistic) or (C+1)/2 (average), and the average policy
gives exactly the random-ranker expectation.

Ranks here are 1-based. Per-row values are returned (float64 [B]) so callers can sum them per
group and merge shards; average them over rows for the reported figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import torch
from torch import Tensor

TiePolicy = Literal["pessimistic", "optimistic", "average"]
TIE_POLICIES: tuple[str, ...] = ("pessimistic", "optimistic", "average")
_EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class RankCounts:
    """Rank counts of each row's positives; see the module docstring. Shapes [B, P] and [B]."""

    greater: Tensor
    tied: Tensor
    tied_pos: Tensor
    mask: Tensor  # [B, P] bool: which positive slots are real (rows may have fewer than P)
    n_candidates: Tensor  # [B] valid candidates per row, positives included

    @classmethod
    def single(cls, greater: Tensor, tied: Tensor, n_candidates: Tensor | int) -> RankCounts:
        """Counts for one positive per row, from [B] tensors."""
        greater = greater.long().reshape(-1, 1)
        n = torch.as_tensor(n_candidates, dtype=torch.long, device=greater.device).expand(greater.shape[0])
        ones = torch.ones_like(greater)
        return cls(greater, tied.long().reshape(-1, 1), ones, ones.bool(), n)

    @property
    def n_pos(self) -> Tensor:
        return self.mask.sum(1)

    @property
    def is_single(self) -> bool:
        return bool((self.n_pos == 1).all())


def rank_counts(scores: Tensor, positives: Tensor, valid: Tensor | None = None) -> RankCounts:
    """Rank counts from a score matrix [B, C] (higher is better).

    positives: LongTensor [B] (the column of each row's single positive) or BoolTensor [B, C]
    (relevance mask, several positives per row). valid: BoolTensor [B, C], False for padding
    candidates, which are neither counted nor ranked. Scores must be finite.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    B, C = scores.shape
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    if positives.dtype != torch.bool:
        col = positives.long().reshape(B, 1)
        if not valid.gather(1, col).all():
            raise ValueError("a positive is marked invalid")
        s_pos = scores.gather(1, col)
        greater = ((scores > s_pos) & valid).sum(1)
        tied = ((scores == s_pos) & valid).sum(1) - 1
        return RankCounts.single(greater, tied, valid.sum(1))

    rel = positives
    if (rel & ~valid).any():
        raise ValueError("a positive is marked invalid")
    n_pos = rel.sum(1)
    if (n_pos == 0).any():
        bad = int(torch.nonzero(n_pos == 0)[0, 0])
        raise ValueError(f"row {bad} has no positive")
    P = int(n_pos.max())
    # Positive columns first (stable, so in column order), then the first P columns are the slots.
    order = torch.sort(rel.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :P]
    mask = rel.gather(1, order)
    s_p = scores.gather(1, order).double().contiguous()
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=scores.device)
    # Ascending sorted rows; -inf marks padding and never equals a (finite) positive score.
    all_sorted = torch.sort(torch.where(valid, scores.double(), neg_inf), dim=1).values.contiguous()
    n_gt = C - torch.searchsorted(all_sorted, s_p, right=True)
    n_ge = C - torch.searchsorted(all_sorted, s_p, right=False)
    pos_sorted = torch.sort(torch.where(rel, scores.double(), neg_inf), dim=1).values.contiguous()
    tied_pos = torch.searchsorted(pos_sorted, s_p, right=True) - torch.searchsorted(
        pos_sorted, s_p, right=False
    )
    zero = torch.zeros_like(n_gt)
    return RankCounts(
        greater=torch.where(mask, n_gt, zero),
        tied=torch.where(mask, n_ge - n_gt - 1, zero),
        tied_pos=torch.where(mask, tied_pos, torch.ones_like(n_gt)),
        mask=mask,
        n_candidates=valid.sum(1),
    )


# ---------------------------------------------------------------- per-position gains


@dataclass(frozen=True)
class _Gain:
    """A metric's gain f(r) at 1-based rank r, and F(n) = sum_{r=1..n} f(r); float64."""

    f: Callable[[Tensor], Tensor]
    F: Callable[[Tensor], Tensor]


def _table_gain(gains: Tensor) -> _Gain:
    """Gains f(1..K) given as a table, zero beyond K."""
    K = len(gains)
    cum = torch.cat([gains.new_zeros(1), gains.cumsum(0)])
    padded = torch.cat([gains.new_zeros(1), gains, gains.new_zeros(1)])  # f(0) = f(K+1) = 0
    return _Gain(
        f=lambda r: padded.to(r.device)[r.clamp(min=0, max=K + 1)],
        F=lambda n: cum.to(n.device)[n.clamp(min=0, max=K)],
    )


def _hits(k: int) -> _Gain:
    return _Gain(f=lambda r: (r <= k).double(), F=lambda n: n.clamp(min=0, max=k).double())


def _dcg_gains(k: int) -> Tensor:
    r = torch.arange(1, k + 1, dtype=torch.float64)
    return 1.0 / torch.log2(r + 1.0)


def _reciprocal(k: int | None) -> _Gain:
    # F(n) = H_n = digamma(n + 1) + Euler's gamma (H_0 = 0), so no table up to the catalogue size.
    kmax = torch.iinfo(torch.long).max if k is None else k
    return _Gain(
        f=lambda r: torch.where(r <= kmax, 1.0 / r.double(), torch.zeros_like(r, dtype=torch.float64)),
        F=lambda n: torch.special.digamma(n.clamp(min=0, max=kmax).double() + 1.0) + _EULER_GAMMA,
    )


_RANK = _Gain(f=lambda r: r.double(), F=lambda n: n.double() * (n.double() + 1) / 2)


def _expected(gain: _Gain, c: RankCounts, policy: str) -> Tensor:
    """Expected gain of each positive under the tie policy; [B, P], 0 at padded slots.

    The positive's possible positions are lo+1 .. lo+n; a single position is read from f
    directly (exact), a block is averaged through F."""
    g, t, m = c.greater, c.tied, c.tied_pos
    if policy == "optimistic":
        lo, n = g, m
    elif policy == "pessimistic":
        lo, n = g + t + 1 - m, m
    elif policy == "average":
        lo, n = g, t + 1
    else:
        raise ValueError(f"unknown tie policy {policy!r}; expected one of {TIE_POLICIES}")
    val = torch.where(n == 1, gain.f(lo + 1), (gain.F(lo + n) - gain.F(lo)) / n)
    return torch.where(c.mask, val, torch.zeros_like(val))


def _need_single(c: RankCounts, name: str) -> None:
    if not c.is_single:
        raise ValueError(f"{name} is defined for one positive per row; use recall/ndcg for several")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"cut-off K must be >= 1, got {k}")


# ---------------------------------------------------------------- rank metrics


def mean_rank(c: RankCounts, policy: TiePolicy = "average") -> Tensor:
    """1-based rank of the single positive: 1 + greater (+ tied if pessimistic, + tied/2 if average)."""
    _need_single(c, "mean_rank")
    return _expected(_RANK, c, policy)[:, 0]


def hit_rate(c: RankCounts, k: int, policy: TiePolicy = "average") -> Tensor:
    """HR@K = 1[rank <= K] for one positive; with several, the "any-hit" form 1[some positive in top K].

    Any-hit under the average policy is exact: only the best positive's tied block matters; if
    it straddles the cut-off with s = K - greater slots left, n = tied + 1 items and m positives,
    P(hit) = 1 - C(n - m, s) / C(n, s).
    """
    _check_k(k)
    if c.is_single:
        return _expected(_hits(k), c, policy)[:, 0]
    big = torch.iinfo(torch.long).max
    g_masked = torch.where(c.mask, c.greater, torch.full_like(c.greater, big))
    best = g_masked.argmin(1, keepdim=True)
    g = c.greater.gather(1, best)[:, 0]
    n = c.tied.gather(1, best)[:, 0] + 1
    m = c.tied_pos.gather(1, best)[:, 0]
    if policy == "optimistic":
        return (g + 1 <= k).double()
    if policy == "pessimistic":
        return (g + n - m + 1 <= k).double()
    if policy != "average":
        raise ValueError(f"unknown tie policy {policy!r}; expected one of {TIE_POLICIES}")
    s = (k - g).clamp(min=0, max=None)
    s = torch.minimum(s, n)
    lg = torch.lgamma
    nm, s_d, n_d = (n - m).double(), s.double(), n.double()
    # C(n-m, s) / C(n, s) = (n-m)! (n-s)! / ((n-m-s)! n!), zero when s > n - m.
    log_ratio = lg(nm + 1) + lg(n_d - s_d + 1) - lg((nm - s_d).clamp(min=0) + 1) - lg(n_d + 1)
    miss = torch.where(s > n - m, torch.zeros_like(log_ratio), torch.exp(log_ratio))
    return 1.0 - miss


def recall(c: RankCounts, k: int, policy: TiePolicy = "average") -> Tensor:
    """Recall@K = |R ∩ top-K| / |R| (PEACE's Hit@K); equals HR@K with one positive."""
    _check_k(k)
    return _expected(_hits(k), c, policy).sum(1) / c.n_pos


def ndcg(c: RankCounts, k: int, policy: TiePolicy = "average") -> Tensor:
    """NDCG@K = DCG/IDCG, DCG = sum_{p in R, rank_p <= K} 1/log2(rank_p + 1),
    IDCG = sum_{r=1..min(|R|, K)} 1/log2(r + 1). One positive: 1[rank <= K] / log2(rank + 1)."""
    _check_k(k)
    gains = _dcg_gains(k)
    dcg = _expected(_table_gain(gains), c, policy).sum(1)
    ideal = torch.cat([gains.new_zeros(1), gains.cumsum(0)]).to(dcg.device)
    return dcg / ideal[c.n_pos.clamp(max=k)]


def mrr(c: RankCounts, policy: TiePolicy = "average", k: int | None = None) -> Tensor:
    """MRR = 1 / rank (optionally 0 beyond rank K). Under the average policy the mean of 1/r over
    the tied block, (H_{g+t+1} - H_g) / (t + 1). A random ranker over C candidates: H_C / C."""
    _need_single(c, "mrr")
    if k is not None:
        _check_k(k)
    return _expected(_reciprocal(k), c, policy)[:, 0]


def rank_auc(c: RankCounts, policy: TiePolicy = "average") -> Tensor:
    """Per-row AUC: the fraction of (positive, negative) pairs of the row ordered correctly, a tie
    counting 0 (pessimistic), 1/2 (average) or 1 (optimistic). One positive among C candidates:
    (C - 1 - greater - tied + w*tied) / (C - 1)."""
    w = {"pessimistic": 0.0, "average": 0.5, "optimistic": 1.0}.get(policy)
    if w is None:
        raise ValueError(f"unknown tie policy {policy!r}; expected one of {TIE_POLICIES}")
    mask = c.mask
    P = c.n_pos.double()
    n = c.n_candidates.double()
    n_neg = n - P
    if (n_neg <= 0).any():
        raise ValueError("rank_auc needs at least one negative per row")
    g, t, m = (x.double() * mask for x in (c.greater, c.tied, c.tied_pos))
    below_all = ((n[:, None] - g - t - 1) * mask).sum(1)
    # Pairs of positives with different scores: each such pair has one "below" member.
    below_pos = (P * P - m.sum(1)) / 2
    tied_neg = ((t - m + 1) * mask).sum(1)
    return (below_all - below_pos + w * tied_neg) / (P * n_neg)


# ---------------------------------------------------------------- PreRec's @K% metrics


def k_from_percent(n_items: int, k_percent: float) -> int:
    """K_abs = floor(N * K% / 100), in exact decimal arithmetic (N=42094, 0.04 -> 16)."""
    k = int(Decimal(int(n_items)) * Decimal(str(k_percent)) / Decimal(100))
    if k < 1:
        raise ValueError(f"K% = {k_percent}% of {n_items} items is below one item")
    return k


def recall_at_k_percent(
    c: RankCounts, n_items: int, k_percent: float, policy: TiePolicy = "average"
) -> Tensor:
    """PreRec Recall@K%: 1[rank <= K_abs], K_abs = floor(N * K%); N = items in the domain.
    A random ranker: K_abs / N."""
    return recall(c, k_from_percent(n_items, k_percent), policy)


def rndcg_gains(n_items: int, k_percent: float, a: float = 2.0, b: float = 15000.0) -> Tensor:
    """r-NDCG gains for ranks 1..K_abs: log(a) / log(a + b (rank - 1) / N) (PreRec Eq. 9-11)."""
    if a <= 1.0 or b < 0:
        raise ValueError(f"r-NDCG needs a > 1 and b >= 0, got a={a}, b={b}")
    k = k_from_percent(n_items, k_percent)
    r = torch.arange(1, k + 1, dtype=torch.float64)
    return math.log(a) / torch.log(a + b * (r - 1) / n_items)


def rndcg_at_k_percent(
    c: RankCounts,
    n_items: int,
    k_percent: float,
    a: float = 2.0,
    b: float = 15000.0,
    policy: TiePolicy = "average",
) -> Tensor:
    """PreRec r-NDCG@K% (Eq. 9-11), single target:

        r-DCG  = 1 / log(a + b (rank - 1) / N)             (9)
        r-iDCG = 1 / log(a)                                 (10)
        r-NDCG = log(a) / log(a + b (rank - 1) / N)         (11), and 0 when rank > K_abs.

    With a = 2 and b = N it is the ordinary NDCG, 1 / log2(rank + 1). The paper uses a = 2,
    b = 15000. A random ranker: (1/N) sum_{r=1..K_abs} r-NDCG(r).
    """
    _need_single(c, "r-NDCG")
    return _expected(_table_gain(rndcg_gains(n_items, k_percent, a, b)), c, policy)[:, 0]


# ---------------------------------------------------------------- AUC / GAUC over labelled rows


def group_auc(
    scores: Tensor, labels: Tensor, groups: Tensor, policy: TiePolicy = "average"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AUC of each group of labelled rows (Mann-Whitney: the fraction of (positive, negative)
    pairs of a group with the positive scored higher; a tie counts 0, 1/2 or 1 by policy).

    Returns (group ids, auc [NaN where a group lacks a class], n_rows, n_positives).
    """
    w = {"pessimistic": 0.0, "average": 0.5, "optimistic": 1.0}.get(policy)
    if w is None:
        raise ValueError(f"unknown tie policy {policy!r}; expected one of {TIE_POLICIES}")
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).bool()
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    uniq, g = torch.unique(groups.reshape(-1), return_inverse=True)
    G = len(uniq)
    # Sort by (group, score): stable sort by score, then stable sort by group.
    order = torch.sort(s, stable=True).indices
    order = order[torch.sort(g[order], stable=True).indices]
    gs, ss, ys = g[order], s[order], y[order]
    N = len(ss)
    new_block = torch.ones(N, dtype=torch.bool, device=s.device)
    new_block[1:] = (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])
    block = new_block.long().cumsum(0) - 1
    block_start = torch.nonzero(new_block)[:, 0][block]
    # Negatives before position i, counted over the whole sorted array (exclusive prefix sum).
    neg = (~ys).long()
    neg_before = torch.cat([neg.new_zeros(1), neg.cumsum(0)])
    group_first = torch.zeros(G, dtype=torch.long, device=s.device).scatter_reduce(
        0, gs, torch.arange(N, device=s.device), reduce="amin", include_self=False
    )
    neg_below = neg_before[block_start] - neg_before[group_first[gs]]
    block_neg = torch.zeros(int(block[-1]) + 1 if N else 0, dtype=torch.long, device=s.device)
    block_neg.index_add_(0, block, neg)
    pair_score = (neg_below.double() + w * block_neg[block].double()) * ys
    correct = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, gs, pair_score)
    n_rows = torch.bincount(g, minlength=G)
    n_pos = torch.bincount(g, weights=y.double(), minlength=G).long()
    n_neg = n_rows - n_pos
    auc = correct / (n_pos * n_neg).double()
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, math.nan))
    return uniq, auc, n_rows, n_pos


def auc(scores: Tensor, labels: Tensor, policy: TiePolicy = "average") -> float:
    """Global AUC of labelled rows: P(score(positive) > score(negative)), ties per policy."""
    one_group = torch.zeros(scores.numel(), dtype=torch.long, device=scores.device)
    _, a, _, _ = group_auc(scores, labels, one_group, policy)
    if math.isnan(float(a[0])):
        raise ValueError("AUC needs at least one positive and one negative label")
    return float(a[0])


def gauc(
    scores: Tensor,
    labels: Tensor,
    groups: Tensor,
    weight: Literal["impressions", "positives", "uniform"] = "impressions",
    policy: TiePolicy = "average",
) -> float:
    """Group AUC: sum_g w_g AUC_g / sum_g w_g over groups (users) having both labels, with
    w_g = the group's rows ("impressions", as in DIN), its positives, or 1 ("uniform")."""
    _, a, n_rows, n_pos = group_auc(scores, labels, groups, policy)
    ok = ~torch.isnan(a)
    if not ok.any():
        raise ValueError("GAUC needs a group with both a positive and a negative label")
    by = {"impressions": n_rows.double(), "positives": n_pos.double(), "uniform": torch.ones_like(a)}
    wts = by.get(weight)
    if wts is None:
        raise ValueError(f"unknown GAUC weight {weight!r}; expected impressions, positives or uniform")
    return float((a[ok] * wts[ok]).sum() / wts[ok].sum())


# ---------------------------------------------------------------- random-ranker references


def random_expectation(metric: str, n_candidates: int, k: int | None = None, **kw: float) -> float:
    """Closed form of a metric under a uniformly random ranking of one positive among C candidates:
    hr: K/C; ndcg: sum_{r<K} 1/(C log2(r+2)); mrr: H_C/C; rank: (C+1)/2; auc: 1/2;
    recall%: K_abs/N; rndcg%: (1/N) sum_{r<=K_abs} r-NDCG(r) (kw: k_percent, a, b)."""
    C = n_candidates
    if metric == "hr":
        return min(k, C) / C
    if metric == "ndcg":
        return float(_dcg_gains(min(k, C)).sum()) / C
    if metric == "mrr":
        return float(_reciprocal(None).F(torch.tensor(C))) / C
    if metric == "rank":
        return (C + 1) / 2
    if metric == "auc":
        return 0.5
    if metric == "recall%":
        return k_from_percent(C, kw["k_percent"]) / C
    if metric == "rndcg%":
        return float(rndcg_gains(C, kw["k_percent"], kw.get("a", 2.0), kw.get("b", 15000.0)).sum()) / C
    raise ValueError(f"no closed form for metric {metric!r}")
