"""Non-learned baselines every results table carries: popularity (POP) and Random."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.evaluator import RandomScorer

__all__ = ["PopularityScorer", "RandomScorer", "baseline_scorer"]


class PopularityScorer:
    """POP: an item scores its training interaction count within the row's domain (`EvalSet.item_counts`)."""

    def __init__(self, data: EvalSet) -> None:
        if data.item_counts is None:
            raise ValueError(f"{data.name}: popularity needs item_counts (training counts per domain)")
        self.catalogue = data.catalogue
        self.counts = {d: torch.as_tensor(c, dtype=torch.float32) for d, c in data.item_counts.items()}

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        cat = self.catalogue[domain]
        raw = items.cpu().numpy()
        pos = np.minimum(np.searchsorted(cat, raw), len(cat) - 1)
        known = torch.from_numpy(cat[pos] == raw)
        scores = torch.where(known, self.counts[domain][torch.from_numpy(pos)], torch.zeros(()))
        if items.dim() == 1:
            return scores.unsqueeze(0).expand(len(users["row"]), -1)
        return scores


def baseline_scorer(name: str, data: EvalSet, seed: int = 0):
    """`pop` or `random` for `data`."""
    if name == "pop":
        return PopularityScorer(data)
    if name == "random":
        return RandomScorer(seed)
    raise ValueError(f"unknown baseline {name!r}; expected pop or random")
