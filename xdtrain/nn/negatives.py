"""Negative sampling for training: uniform item ids that avoid what the user has already seen."""

from __future__ import annotations

import torch
from torch import Tensor


def uniform_negatives(num_items: int, shape: tuple[int, int], exclude: Tensor | None = None,
                      generator: torch.Generator | None = None, max_rounds: int = 100) -> Tensor:
    """[B, M] ids drawn uniformly from 1..num_items (0 is padding), redrawn while in `exclude`.

    `exclude` [B, L] holds each row's seen ids (any order, 0 = padding, ignored). Collisions are
    redrawn in vectorised rounds; after `max_rounds` (only if a user saw nearly every item) a
    leftover collision is kept rather than looping forever.
    """
    B, M = shape
    out = torch.randint(1, num_items + 1, (B, M), generator=generator)
    if exclude is None:
        return out
    if exclude.shape[0] != B:
        raise ValueError(f"exclude has {exclude.shape[0]} rows, expected {B}")
    seen = exclude.sort(dim=1).values
    last = seen.shape[1] - 1
    for _ in range(max_rounds):
        pos = torch.searchsorted(seen, out).clamp(max=last)
        hit = seen.gather(1, pos) == out
        n = int(hit.sum())
        if n == 0:
            break
        out[hit] = torch.randint(1, num_items + 1, (n,), generator=generator)
    return out
