"""Metrics: hand-computed values, tie policies, random-ranker closed forms, brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from xdtrain.eval import metrics as M
from xdtrain.eval.metrics import RankCounts, rank_counts

POLICIES = ("pessimistic", "optimistic", "average")


def single(scores: list[float], pos: int = 0) -> RankCounts:
    return rank_counts(torch.tensor([scores], dtype=torch.float64), torch.tensor([pos]))


def at_rank0(r: int, c: int = 1000) -> RankCounts:
    """One positive at 0-based rank r among c candidates, no ties."""
    return RankCounts.single(torch.tensor([r]), torch.tensor([0]), c)


# ---------------------------------------------------------------- hand-computed values


def test_single_positive_hand_values():
    # Positive 0.7; 0.9 and 0.8 above it; 0.1, 0.2 below: rank 3 of 5.
    c = single([0.7, 0.9, 0.1, 0.8, 0.2])
    assert c.greater.item() == 2 and c.tied.item() == 0 and c.n_candidates.item() == 5
    for p in POLICIES:  # no ties: every policy agrees
        assert M.mean_rank(c, p).item() == 3
        assert M.hit_rate(c, 2, p).item() == 0 and M.hit_rate(c, 3, p).item() == 1
        assert M.ndcg(c, 3, p).item() == pytest.approx(1 / math.log2(4))
        assert M.ndcg(c, 2, p).item() == 0
        assert M.mrr(c, p).item() == pytest.approx(1 / 3)
        assert M.mrr(c, p, k=2).item() == 0
        assert M.rank_auc(c, p).item() == pytest.approx(2 / 4)
        assert M.recall(c, 3, p).item() == 1


def test_amid_spec_metric_cases():
    # AMID spec 10.2 E, with its 0-based rank: HR@10 = 1[rank < 10], NDCG@10 = 1/log2(rank + 2).
    c = at_rank0(0)
    assert M.hit_rate(c, 10).item() == 1 and M.ndcg(c, 10).item() == 1
    c = at_rank0(9)
    assert M.hit_rate(c, 10).item() == 1
    assert M.ndcg(c, 10).item() == pytest.approx(1 / math.log2(11))
    c = at_rank0(10)
    assert M.hit_rate(c, 10).item() == 0 and M.ndcg(c, 10).item() == 0
    for r in (0, 3, 57):
        assert M.mrr(at_rank0(r)).item() == pytest.approx(1 / (r + 1))
    # All 1000 scores tied: the positive ranks last under the pessimistic policy.
    tied = single([0.5] * 1000)
    assert M.mean_rank(tied, "pessimistic").item() == 1000
    assert M.hit_rate(tied, 10, "pessimistic").item() == 0


def test_ties_partial_block():
    # Positive 0.5 with 0.9 above, two more 0.5s, 0.1 below: block = positions 2..4.
    c = single([0.5, 0.9, 0.5, 0.5, 0.1])
    assert (c.greater.item(), c.tied.item()) == (1, 2)
    assert M.mean_rank(c, "pessimistic").item() == 4
    assert M.mean_rank(c, "optimistic").item() == 2
    assert M.mean_rank(c, "average").item() == 3
    assert M.mrr(c, "average").item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert M.ndcg(c, 3, "average").item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert M.hit_rate(c, 3, "average").item() == pytest.approx(2 / 3)
    assert M.hit_rate(c, 3, "pessimistic").item() == 0
    assert M.hit_rate(c, 3, "optimistic").item() == 1
    # AUC over 4 negatives: beats 1, ties 2, loses 1.
    assert M.rank_auc(c, "pessimistic").item() == pytest.approx(1 / 4)
    assert M.rank_auc(c, "average").item() == pytest.approx(2 / 4)
    assert M.rank_auc(c, "optimistic").item() == pytest.approx(3 / 4)


@pytest.mark.parametrize("C", [1, 2, 7, 100])
def test_all_tied_rank_and_random_expectation(C):
    c = single([0.25] * C)
    assert M.mean_rank(c, "pessimistic").item() == C
    assert M.mean_rank(c, "optimistic").item() == 1
    assert M.mean_rank(c, "average").item() == pytest.approx((C + 1) / 2)
    # Averaging over the tied block gives exactly the random-ranker expectation.
    for k in (1, 5, 10):
        assert M.hit_rate(c, k).item() == pytest.approx(M.random_expectation("hr", C, k))
        assert M.ndcg(c, k).item() == pytest.approx(M.random_expectation("ndcg", C, k))
    assert M.mrr(c).item() == pytest.approx(M.random_expectation("mrr", C))
    if C > 1:
        assert M.rank_auc(c).item() == pytest.approx(0.5)


def test_multi_positive_hand_values():
    # Relevant items at positions 1, 2 and 6 of 6 (no ties).
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    rel = torch.tensor([[True, True, False, False, False, True]])
    c = rank_counts(scores, rel)
    assert c.greater.tolist() == [[0, 1, 5]]
    idcg5 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert M.recall(c, 5).item() == pytest.approx(2 / 3)
    assert M.ndcg(c, 5).item() == pytest.approx((1 + 1 / math.log2(3)) / idcg5)
    # PEACE's evidence: with several positives NDCG@K can exceed the recall-form Hit@K.
    assert M.ndcg(c, 5).item() > M.recall(c, 5).item()
    assert M.ndcg(c, 1).item() == 1 and M.recall(c, 1).item() == pytest.approx(1 / 3)
    assert M.hit_rate(c, 1).item() == 1
    # AUC: 3 positives x 3 negatives; the last positive loses to all 3 negatives.
    assert M.rank_auc(c).item() == pytest.approx(6 / 9)


def test_multi_positive_padding_rows():
    # Row 0 has 2 positives, row 1 has 1; values match each row evaluated alone.
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.8, 0.6]])
    rel = torch.tensor([[True, False, True, False], [False, False, False, True]])
    c = rank_counts(scores, rel)
    assert c.mask.tolist() == [[True, True], [True, False]]
    for r in range(2):
        cr = rank_counts(scores[r : r + 1], rel[r : r + 1])
        for k in (1, 2, 3):
            assert M.ndcg(c, k)[r].item() == pytest.approx(M.ndcg(cr, k).item())
            assert M.recall(c, k)[r].item() == pytest.approx(M.recall(cr, k).item())
        assert M.rank_auc(c)[r].item() == pytest.approx(M.rank_auc(cr).item())


def test_valid_mask_ignores_padding():
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.1]])
    valid = torch.tensor([[True, False, True, True]])
    c = rank_counts(scores, torch.tensor([0]), valid)
    assert (c.greater.item(), c.n_candidates.item()) == (1, 3)
    cm = rank_counts(scores, torch.tensor([[True, False, False, False]]), valid)
    assert (cm.greater.item(), cm.n_candidates.item()) == (1, 3)


# ---------------------------------------------------------------- brute force over tie-breaks


def _orderings(scores: list[float]):
    """Every ordering of the candidates consistent with the scores (ties in any order)."""
    for perm in itertools.permutations(range(len(scores))):
        if all(scores[perm[i]] >= scores[perm[i + 1]] for i in range(len(perm) - 1)):
            yield perm


def _brute(scores, rel, k):
    out = []
    for perm in _orderings(scores):
        pos = [i + 1 for i, j in enumerate(perm) if rel[j]]
        R = len(pos)
        dcg = sum(1 / math.log2(p + 1) for p in pos if p <= k)
        idcg = sum(1 / math.log2(r + 1) for r in range(1, min(R, k) + 1))
        hits = sum(p <= k for p in pos)
        out.append((hits / R, float(hits > 0), dcg / idcg))
    return out


def test_multi_positive_ties_match_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(25):
        C = 6
        scores = torch.randint(0, 3, (C,), generator=g).double().tolist()
        rel = torch.rand(C, generator=g) < 0.4
        if not rel.any():
            rel[0] = True
        c = rank_counts(torch.tensor([scores]), rel[None])
        for k in (1, 2, 4):
            vals = _brute(scores, rel.tolist(), k)
            # Average = mean over tie-breaks; pessimistic/optimistic = worst/best tie-break.
            for j, fn in enumerate((M.recall, M.hit_rate, M.ndcg)):
                col = [v[j] for v in vals]
                assert fn(c, k, "average").item() == pytest.approx(sum(col) / len(col)), (scores, rel, k, j)
                assert fn(c, k, "pessimistic").item() == pytest.approx(min(col)), (scores, rel, k, j)
                assert fn(c, k, "optimistic").item() == pytest.approx(max(col)), (scores, rel, k, j)


def test_single_and_mask_forms_agree():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 9), generator=g).double()
    pos = torch.randint(0, 9, (50,), generator=g)
    a = rank_counts(scores, pos)
    b = rank_counts(scores, torch.nn.functional.one_hot(pos, 9).bool())
    for p in POLICIES:
        for k in (1, 3):
            assert torch.allclose(M.hit_rate(a, k, p), M.hit_rate(b, k, p))
            assert torch.allclose(M.ndcg(a, k, p), M.ndcg(b, k, p))
        assert torch.allclose(M.mrr(a, p), M.mrr(b, p))
        assert torch.allclose(M.rank_auc(a, p), M.rank_auc(b, p))


# ---------------------------------------------------------------- random ranker


def test_random_ranker_lands_on_closed_forms():
    g = torch.Generator().manual_seed(7)
    rows, C = 40000, 50
    c = rank_counts(
        torch.rand(rows, C, generator=g, dtype=torch.float64), torch.zeros(rows, dtype=torch.long)
    )
    for metric, fn, k in (
        ("hr", lambda c: M.hit_rate(c, 10), 10),
        ("ndcg", lambda c: M.ndcg(c, 10), 10),
        ("mrr", M.mrr, None),
        ("rank", M.mean_rank, None),
        ("auc", M.rank_auc, None),
    ):
        v = fn(c)
        se = v.std().item() / math.sqrt(rows)
        assert abs(v.mean().item() - M.random_expectation(metric, C, k)) < 4 * se, metric
    # The closed forms themselves (E[HR@K] = K/C, E[MRR] = H_C / C, NDCG sum).
    assert M.random_expectation("hr", C, 10) == pytest.approx(10 / 50)
    assert M.random_expectation("mrr", C) == pytest.approx(sum(1 / r for r in range(1, C + 1)) / C)
    assert M.random_expectation("ndcg", C, 10) == pytest.approx(
        sum(1 / (C * math.log2(r + 2)) for r in range(10))
    )


def test_idp_random_sanity_values():
    # IDP spec 6.2: 100 candidates -> HR@5 0.05, NDCG@3 ~0.0213, NDCG@5 ~0.0295, MRR ~0.0519.
    assert M.random_expectation("hr", 100, 5) == pytest.approx(0.05)
    assert M.random_expectation("ndcg", 100, 3) == pytest.approx(0.0213, abs=5e-5)
    assert M.random_expectation("ndcg", 100, 5) == pytest.approx(0.0295, abs=5e-5)
    assert M.random_expectation("mrr", 100) == pytest.approx(0.0519, abs=5e-5)


# ---------------------------------------------------------------- PreRec @K% metrics


def test_k_rounding_prerec_domains():
    # floor(N * K%): AU 16, MX 17, DE 28, JP 9 at 0.04 %; Online Retail 21 at 0.5 %.
    assert [M.k_from_percent(n, 0.04) for n in (42094, 43095, 70527, 22591)] == [16, 17, 28, 9]
    assert M.k_from_percent(4223, 0.5) == 21
    assert M.k_from_percent(25000, 0.04) == 10  # exact decimal: no 9.999... rounding down
    with pytest.raises(ValueError, match="below one item"):
        M.k_from_percent(100, 0.04)


def test_rndcg_formula():
    N, pct = 1000, 2.0  # K_abs = 20
    for r in (1, 5, 20):
        c = RankCounts.single(torch.tensor([r - 1]), torch.tensor([0]), N)
        # Eq. 11 with a = 2, b = 15000.
        assert M.rndcg_at_k_percent(c, N, pct).item() == pytest.approx(
            math.log(2) / math.log(2 + 15000 * (r - 1) / N)
        )
        # a = 2, b = N: the textbook NDCG 1/log2(rank + 1).
        assert M.rndcg_at_k_percent(c, N, pct, a=2, b=N).item() == pytest.approx(1 / math.log2(r + 1))
        assert M.rndcg_at_k_percent(c, N, pct, a=2, b=N).item() == pytest.approx(M.ndcg(c, 20).item())
        assert M.recall_at_k_percent(c, N, pct).item() == 1
    c = RankCounts.single(torch.tensor([0]), torch.tensor([0]), N)
    assert M.rndcg_at_k_percent(c, N, pct).item() == 1.0
    c = RankCounts.single(torch.tensor([20]), torch.tensor([0]), N)  # rank 21 > K_abs
    assert M.rndcg_at_k_percent(c, N, pct).item() == 0 and M.recall_at_k_percent(c, N, pct).item() == 0


def test_prerec_random_reference_values():
    # PreRec spec T1 / paper Table 1 Random column.
    assert M.random_expectation("recall%", 42094, k_percent=0.04) == pytest.approx(16 / 42094)
    assert M.random_expectation("recall%", 42094, k_percent=0.04) == pytest.approx(0.00038, abs=5e-6)
    assert M.random_expectation("rndcg%", 42094, k_percent=0.04) == pytest.approx(0.0002, abs=5e-6)
    assert M.random_expectation("recall%", 4223, k_percent=0.5) == pytest.approx(0.00497, abs=5e-6)
    assert M.random_expectation("rndcg%", 4223, k_percent=0.5) == pytest.approx(0.00124, abs=5e-6)
    assert M.random_expectation("rndcg%", 4223, k_percent=0.5, b=1200) == pytest.approx(0.0025, abs=5e-5)
    # All scores tied + average policy = the random expectation, exactly.
    N = 42094
    c = RankCounts.single(torch.tensor([0]), torch.tensor([N - 1]), N)
    assert M.recall_at_k_percent(c, N, 0.04).item() == pytest.approx(16 / N)
    assert M.rndcg_at_k_percent(c, N, 0.04).item() == pytest.approx(
        M.random_expectation("rndcg%", N, k_percent=0.04)
    )


# ---------------------------------------------------------------- AUC / GAUC on labelled rows


def _brute_auc(s, y, w):
    pairs = [(a, b) for a, ya in zip(s, y) for b, yb in zip(s, y) if ya and not yb]
    return sum(1.0 if a > b else (w if a == b else 0.0) for a, b in pairs) / len(pairs)


def test_auc_hand_value_and_policies():
    s = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    y = torch.tensor([1, 0, 1, 0, 0])
    # Pairs: 0.9 beats all 3 negatives; 0.8 ties one (0.8), beats two -> (3 + 2 + 0.5) / 6.
    assert M.auc(s, y) == pytest.approx(5.5 / 6)
    assert M.auc(s, y, "pessimistic") == pytest.approx(5 / 6)
    assert M.auc(s, y, "optimistic") == pytest.approx(6 / 6)


def test_auc_and_gauc_match_brute_force():
    g = torch.Generator().manual_seed(11)
    n = 300
    s = torch.randint(0, 6, (n,), generator=g).double()
    y = torch.rand(n, generator=g) < 0.3
    grp = torch.randint(0, 12, (n,), generator=g) * 1000 + 5  # arbitrary group ids
    for p, w in (("pessimistic", 0.0), ("average", 0.5), ("optimistic", 1.0)):
        assert M.auc(s, y, p) == pytest.approx(_brute_auc(s.tolist(), y.tolist(), w))
        num = den = num_u = den_u = 0.0
        for gid in grp.unique():
            sel = grp == gid
            if y[sel].all() or not y[sel].any():
                continue
            a = _brute_auc(s[sel].tolist(), y[sel].tolist(), w)
            num, den = num + a * sel.sum().item(), den + sel.sum().item()
            num_u, den_u = num_u + a, den_u + 1
        assert M.gauc(s, y, grp, "impressions", p) == pytest.approx(num / den)
        assert M.gauc(s, y, grp, "uniform", p) == pytest.approx(num_u / den_u)


def test_gauc_skips_single_class_groups():
    s = torch.tensor([0.9, 0.1, 0.5, 0.6, 0.7])
    y = torch.tensor([1, 0, 1, 1, 0])
    grp = torch.tensor([0, 0, 1, 1, 2])  # group 0 AUC 1; group 1 all positive; group 2 all negative
    assert M.gauc(s, y, grp) == pytest.approx(1.0)


# ---------------------------------------------------------------- errors


def test_errors_are_clear():
    with pytest.raises(ValueError, match="NaN"):
        rank_counts(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="row 1 has no positive"):
        rank_counts(torch.rand(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="K must be >= 1"):
        M.hit_rate(at_rank0(0), 0)
    with pytest.raises(ValueError, match="tie policy"):
        M.hit_rate(at_rank0(0), 1, "random")  # type: ignore[arg-type]
    multi = rank_counts(torch.rand(1, 4), torch.tensor([[True, True, False, False]]))
    with pytest.raises(ValueError, match="one positive per row"):
        M.mrr(multi)
    with pytest.raises(ValueError, match="one positive and one negative"):
        M.auc(torch.rand(3), torch.ones(3))
