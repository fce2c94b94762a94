"""Ids on the client side: validation to int64, deduplication, and routing ahead of time.

The engine passes np.unique output (sorted, distinct): strictly increasing ids are recognised in
one O(n) pass, with no sort and no copy. Other ids are sorted once to look for repeats (as int32
when they fit: half the time of an int64 sort; a byte map over compact ids was tried instead and
was no faster here), and factorized only if there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from xdtrain.ps.slots import SlotMap


def as_ids(ids: Any) -> np.ndarray:
    """A contiguous int64 numpy view/copy of ids given as a tensor, array or list."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"ids must be integers (got dtype {arr.dtype}); "
            "hash string ids once with xdtrain.data.schemas.hash_ids"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def _narrow(ids: np.ndarray) -> np.ndarray:
    """ids as int32 when they all fit (an exact cast): 32-bit keys sort in about half the time."""
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    if len(ids) >= 4096 and lo <= int(ids.min()) and int(ids.max()) <= hi:
        return ids.astype(np.int32)
    return ids


def dedup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct ids, inverse) with uniq[inverse] == ids; inverse None when ids are already distinct."""
    if len(ids) < 2:
        return ids, None
    if (ids[1:] > ids[:-1]).all():  # strictly increasing (np.unique output): distinct, no sort needed
        return ids, None
    s = np.sort(_narrow(ids))
    if not (s[1:] == s[:-1]).any():
        return ids, None
    inverse, uniq = pd.factorize(ids)
    return np.ascontiguousarray(uniq, dtype=np.int64), inverse.astype(np.int64, copy=False)


@dataclass(frozen=True)
class RoutedIds:
    """Distinct ids reordered so that each shard's form one block (`route_ids`, `PSClient.route`).

    Pulling these skips dedup and routing, and every shard writes its rows as one contiguous
    block of the output instead of scattering them: the job of a batch builder, ahead of time.
    Pulled rows come back in `ids` order; `ids == caller_ids[order]` (`order` None: same order).
    Made under one `slot_map` object: a client whose map is another one (after a reshard, or
    another client) treats them as plain distinct ids.
    """

    ids: np.ndarray
    blocks: tuple[tuple[int, int, int], ...]  # (shard, start, stop) in ids
    order: np.ndarray | None
    slot_map: SlotMap = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def groups(self) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in ids) per shard, as the router's own routing returns them."""
        if len(self.blocks) == 1:
            return [(self.blocks[0][0], None)]
        return [(k, np.arange(a, b, dtype=np.int64)) for k, a, b in self.blocks]


def route_ids(ids: Any, slot_map: SlotMap) -> RoutedIds:
    """`ids` (distinct) grouped by the shard that owns them, increasing within each shard."""
    ids = as_ids(ids)
    if dedup(ids)[1] is not None:
        raise ValueError("route_ids: ids repeat; pass distinct ids (e.g. np.unique(ids))")
    if not len(ids):
        return RoutedIds(ids, (), None, slot_map)
    groups = slot_map.split(ids) if slot_map.num_shards > 1 else [(0, None)]
    if len(groups) == 1:
        return RoutedIds(ids, ((groups[0][0], 0, len(ids)),), None, slot_map)
    order, blocks = shard_blocks(groups)
    return RoutedIds(ids[order], blocks, order, slot_map)


def shard_blocks(groups: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    """(order, blocks) for per-shard positions `groups`: ids[order] has each shard's ids in one block,
    blocks[i] = (shard, start, stop)."""
    order = np.concatenate([sel for _, sel in groups])
    bounds = np.cumsum([0] + [len(sel) for _, sel in groups])
    return order, tuple((k, int(bounds[i]), int(bounds[i + 1])) for i, (k, _) in enumerate(groups))
