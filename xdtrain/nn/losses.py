"""Training losses on logits (dot products of user states with item embeddings).

Shapes: `pos` [N] is the logit of each row's true next item, `neg` [N, K] the logits of K sampled
negatives for that row, `logits` [N, V] the logits of a whole catalogue. Rows are the valid
(non-padding) prediction positions, flattened by the caller. Every loss is a mean over rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("bpr", "bce", "sampled_softmax", "full_softmax")


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """BPR (Rendle et al. 2009): mean over rows and negatives of -log sigmoid(pos - neg)."""
    return -F.logsigmoid(pos.unsqueeze(1) - neg).mean()


def bce_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Binary cross-entropy with K negatives, as in SASRec (eq. 7 there, K = 1):
    mean over rows of [-log sigmoid(pos) - sum_k log(1 - sigmoid(neg_k))]."""
    return (-F.logsigmoid(pos) - F.logsigmoid(-neg).sum(dim=1)).mean()


def sampled_softmax_loss(pos: Tensor, neg: Tensor, pos_ids: Tensor | None = None,
                         neg_ids: Tensor | None = None, log_q_pos: Tensor | None = None,
                         log_q_neg: Tensor | None = None) -> Tensor:
    """Cross-entropy of the true item against itself plus K sampled negatives.

    `neg_ids` ([K] shared or [N, K]) with `pos_ids` [N] removes accidental hits: a sampled negative equal to
    the row's positive is masked out, so sampling every item reproduces the full softmax exactly.
    `log_q_*` (log sampling probabilities, same shapes as the logits) apply the logQ correction
    (Bengio & Senecal 2008): logits - log q, which makes the sampled loss an unbiased softmax estimate.
    """
    if log_q_pos is not None:
        pos = pos - log_q_pos
    if log_q_neg is not None:
        neg = neg - log_q_neg
    if neg_ids is not None:
        if pos_ids is None:
            raise ValueError("neg_ids needs pos_ids to remove accidental hits")
        hits = neg_ids.expand_as(neg) == pos_ids.unsqueeze(1)
        neg = neg.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos, dtype=torch.long))


def full_softmax_loss(logits: Tensor, targets: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Cross-entropy over the whole catalogue; `ignore` ([V] bool) masks columns that are not items."""
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    return F.cross_entropy(logits, targets)



def sequence_loss(rows: Tensor, pos_ids: Tensor, embed: Callable[[Tensor], Tensor], loss: str, num_items: int,
                  neg_ids: Tensor | None = None, num_negatives: int = 1,
                  generator: torch.Generator | None = None) -> Tensor:
    """The training loss of prediction rows against an item table reached only through `embed(ids)`.

    rows [N, d]: user states at the positions that predict an item; pos_ids [N]: those items (1..num_items).
    `embed` maps ids to embeddings (a local table, or rows pulled from the parameter server).
      * bpr / bce: `neg_ids` [N, K] per-row negatives (the batch builder draws them, avoiding seen items);
      * sampled_softmax: `neg_ids` [K] shared by all rows, or `num_negatives` uniform draws when None
        (one [N, K] matmul); accidental hits are removed;
      * full_softmax: every item 1..num_items (id 0 is padding and never a candidate).
    """
    pos = (rows * embed(pos_ids)).sum(-1)
    if loss in ("bpr", "bce"):
        if neg_ids is None or neg_ids.dim() != 2:
            raise ValueError(f"loss {loss!r} needs per-row negatives neg_ids [N, K]")
        neg = torch.einsum("nd,nkd->nk", rows, embed(neg_ids))
        return bpr_loss(pos, neg) if loss == "bpr" else bce_loss(pos, neg)
    if loss == "sampled_softmax":
        if neg_ids is None:
            neg_ids = torch.randint(1, num_items + 1, (num_negatives,), generator=generator).to(rows.device)
        return sampled_softmax_loss(pos, rows @ embed(neg_ids).T, pos_ids=pos_ids, neg_ids=neg_ids)
    if loss == "full_softmax":
        all_ids = torch.arange(1, num_items + 1, device=rows.device)
        return full_softmax_loss(rows @ embed(all_ids).T, pos_ids - 1)
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def mean_negative_bce(pos: Tensor, neg: Tensor, pairwise: bool = False) -> Tensor:
    """RecGURU's recommendation loss (Li et al. 2022, eq. 12): the negatives' logits are averaged
    *before* the sigmoid, then a pointwise positive/negative cross-entropy,
    mean over rows of [-log sigmoid(pos) - log(1 - sigmoid(mean_k neg_k))].
    `pairwise`: -log sigmoid(pos - mean_k neg_k) (the authors' code)."""
    m = neg.mean(dim=1)
    if pairwise:
        return -F.logsigmoid(pos - m).mean()
    return (-F.logsigmoid(pos) - F.logsigmoid(-m)).mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """WGAN-GP's penalty (Gulrajani et al. 2017, Alg. 1): mean over pairs of (||grad critic(x_hat)|| - 1)^2
    at x_hat = eps * real + (1 - eps) * fake (row i of `real` paired with row i of `fake`, eps [n, 1]).
    The graph is kept (create_graph), so the penalty back-propagates into the critic."""
    n = min(len(real), len(fake))
    x_hat = (eps[:n] * real[:n].detach() + (1 - eps[:n]) * fake[:n].detach()).requires_grad_(True)
    grad = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]
    return ((grad.norm(dim=1) - 1) ** 2).mean()
