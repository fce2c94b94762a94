"""Ids on the client side: validation to int64, and deduplication.

The engine passes np.unique output (sorted, distinct): strictly increasing ids are recognised in
one O(n) pass, with no sort and no copy. Other ids are sorted once to look for repeats (as int32
when they fit: half the time of an int64 sort; a byte map over compact ids was tried instead and
was no faster here), and factorized only if there are any.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch


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
