"""Synchronous row pushes (`ps.sync=true`): the workers' row gradients summed before the PS sees them.

Without this each worker pushes its own rows and the shard's optimizer steps a row once per push:
a row two workers touched takes two Adam steps (each on half the gradient) where one process on the
global batch takes one. Summing first makes every row take exactly one step per iteration, so a
2-worker run with a stateful PS optimizer computes what a single process computes on the same
global batches. Each worker then pushes an interleaved share of the summed rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from xdtrain.nn.sparse import RowGrads


def sum_row_grads(parts: list[RowGrads]) -> RowGrads:
    """Per table: the sorted union of the parts' ids, each row's gradients summed over the parts
    (in part order, so every worker computes the same bits)."""
    out: RowGrads = {}
    for table in sorted({t for p in parts for t in p}):
        got = [p[table] for p in parts if table in p]
        ids = np.concatenate([i for i, _ in got])
        grads = np.concatenate([g for _, g in got])
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros((len(uniq), grads.shape[1]), dtype=torch.float32)
        summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), torch.from_numpy(grads))
        g = summed.numpy()
        reached = g.any(axis=1)  # gradients that cancelled exactly reach nothing
        out[table] = (uniq[reached], g[reached])
    return out


def share(grads: RowGrads, rank: int, world: int) -> RowGrads:
    """This worker's interleaved share of the summed rows (every row is pushed by exactly one worker)."""
    return {t: (ids[rank::world], g[rank::world]) for t, (ids, g) in grads.items()}


def all_reduce_row_grads(local: RowGrads, world: int) -> RowGrads:
    """Every worker's row gradients summed (a collective: every rank calls it every iteration, an
    idle rank with `{}`)."""
    if world <= 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return sum_row_grads(parts)
