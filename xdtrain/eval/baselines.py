"""Non-learned baselines every results table carries: popularity (POP), Random, and PreRec's SBERT."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xdtrain.data.schemas import DataError
from xdtrain.eval.candidates import EvalSet, list_column
from xdtrain.eval.evaluator import RandomScorer
from xdtrain.text.cache import ItemVectors

__all__ = ["PopularityScorer", "RandomScorer", "SBERTScorer", "baseline_scorer"]


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


class SBERTScorer:
    """SBERT (PreRec, App. B): the user vector is the text vector of the row's last interacted item,
    and an item scores the inner product of the two text vectors. Like PreRec, a row sees the history
    of its own domain only (when the rows carry `history_domains`); a row with none scores 0 everywhere."""

    def __init__(self, data: EvalSet, text: ItemVectors) -> None:
        rows, self.text = data.rows, text
        if data.history_column in rows.schema.names:
            off, hist = list_column(rows.column(data.history_column))
        else:  # no history at all: every row scores 0
            off, hist = np.zeros(rows.num_rows + 1, np.int64), np.zeros(0, np.int64)
        hist = np.asarray(hist, dtype=np.int64)
        dom = data.domains_of_rows()
        owner = np.repeat(np.arange(rows.num_rows), np.diff(off))
        keep = np.ones(len(hist), dtype=bool)
        if "history_domains" in rows.schema.names:
            keep = list_column(rows.column("history_domains"))[1].astype(str) == dom[owner]
        last = np.full(rows.num_rows, -1)
        np.maximum.at(last, owner[keep], np.nonzero(keep)[0])  # each row's last kept history position
        vecs = np.zeros((rows.num_rows, text.dim), dtype=np.float32)
        for d in np.unique(dom):
            r = np.nonzero((dom == d) & (last >= 0))[0]
            try:
                vecs[r] = text.lookup(d, hist[last[r]])
            except KeyError as e:
                raise DataError(f"{data.name}: SBERT user vectors: {e.args[0]}") from None
        self.users = torch.from_numpy(vecs)

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        u = self.users[users["row"].cpu()]
        v = torch.from_numpy(self.text.lookup(domain, items.cpu().numpy()))
        if items.dim() == 1:
            return u @ v.T
        return torch.bmm(v, u.unsqueeze(-1)).squeeze(-1)


def baseline_scorer(name: str, data: EvalSet, seed: int = 0, text: ItemVectors | None = None):
    """`pop`, `random` or `sbert` (needs `text`: the item text vectors) for `data`."""
    if name == "pop":
        return PopularityScorer(data)
    if name == "random":
        return RandomScorer(seed)
    if name == "sbert":
        if text is None:
            raise ValueError("baseline 'sbert' needs item text vectors (from the data's 'items' side table)")
        return SBERTScorer(data, text)
    raise ValueError(f"unknown baseline {name!r}; expected pop, random or sbert")
