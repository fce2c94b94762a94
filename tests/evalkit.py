"""Shared eval-test fixtures: a two-domain EvalSet with planted rows and a table-backed scorer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from xdtrain.eval.candidates import EvalSet

SIZES = {"books": 60, "movies": 150}
HIST = 5


def make_set(rows: int = 1200, seed: int = 0, multi: bool = False, counts: bool = False) -> EvalSet:
    """Two domains; every row has HIST distinct history items, none of them a target."""
    rng = np.random.default_rng(seed)
    cat = {d: (i + 1) * 10_000 + np.arange(n) * 3 for i, (d, n) in enumerate(SIZES.items())}
    dom = np.where(rng.random(rows) < 0.5, "books", "movies")
    targets, hist = [], []
    for d in dom:
        pick = rng.choice(cat[d], HIST + 3, replace=False)
        n_pos = int(rng.integers(1, 4)) if multi else 1
        targets.append(pick[:n_pos].tolist() if multi else int(pick[0]))
        hist.append(pick[3 : 3 + HIST].tolist())
    table = pa.table(
        {
            "user_id": rng.integers(0, rows // 3, rows),  # users with several rows
            "item_id": pa.array(targets, type=pa.list_(pa.int64()) if multi else pa.int64()),
            "domain": dom,
            "history": pa.array(hist, type=pa.list_(pa.int64())),
            "overlap": rng.random(rows) < 0.3,
            "age": rng.integers(18, 60, rows),
        }
    )
    item_counts = {d: rng.integers(0, 20, len(c)) for d, c in cat.items()} if counts else None
    return EvalSet(table, cat, item_counts=item_counts, name="synthetic")


class TableScorer:
    """Scores read from a dense [rows, all items] table: a planted, deterministic scorer."""

    def __init__(self, data: EvalSet, table: torch.Tensor | None = None):
        self.ids = torch.as_tensor(np.concatenate([data.catalogue[d] for d in sorted(data.catalogue)]))
        self.table = torch.zeros(data.num_rows, len(self.ids)) if table is None else table
        self.calls: list[tuple[int, ...]] = []

    def col(self, ids) -> torch.Tensor:
        return torch.searchsorted(self.ids, torch.as_tensor(np.asarray(ids)))

    def __call__(self, users, items, *, domain):
        self.calls.append(tuple(items.shape))
        rows = users["row"]
        if items.dim() == 1:
            return self.table[rows[:, None], self.col(items)[None, :]]
        return self.table[rows[:, None], self.col(items)]


def perfect(data: EvalSet) -> TableScorer:
    sc = TableScorer(data)
    pos = data.positives(np.arange(data.num_rows))
    for r in range(data.num_rows):
        sc.table[r, sc.col(pos[r][pos[r] != -1])] = 1.0
    return sc


def row_table(res) -> dict[str, np.ndarray]:
    t = res.rows()
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
