"""The exact k-th smallest timestamp over user partitions, in bounded driver memory.

A chronological split by ratios cuts the whole log at the timestamps of two global ranks. Here the
timestamps become order-preserving int64 keys (`to_key`: integers as they are, floats by their IEEE
bits), and each pass over the partitions splits the current key range into HIST_BINS integer bins,
keeping the one that holds the rank; once that bin is a single key or small enough it is collected.
Every pass shrinks the range HIST_BINS-fold, so ties of any size end the search.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from xdtrain.data.partition_map import partition_map
from xdtrain.data.schemas import DataError

HIST_BINS = 1 << 16  # bins per refinement pass
COLLECT_MAX = 1 << 20  # keys collected to the driver once a bin holds at most this many


def to_key(v: np.ndarray) -> np.ndarray:
    """int64 keys in the order of `v`: integers as they are, floats by their IEEE bits (negative
    ones flipped), so that ranks are found exactly whatever the type."""
    if np.issubdtype(v.dtype, np.integer):
        return v.astype(np.int64)
    bits = np.ascontiguousarray(v, np.float64).view(np.int64)
    return np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)


def from_key(key: int, like: str) -> int | float:
    if like == "int":
        return int(key)
    bits = np.int64(key)
    return float(np.asarray(bits if bits >= 0 else bits ^ np.int64(0x7FFFFFFFFFFFFFFF)).view(np.float64))


def cut_values(n_parts: int, keys: Callable[[int], np.ndarray], ratios: list[float], like: str) -> list:
    """The in-memory chronological cut as inclusive bounds: rows up to the timestamp at rank
    round(r0 n) - 1 train, up to the one at rank round((r0 + r1) n) - 1 valid (ranks in time order;
    None: no row)."""
    got = list(partition_map(n_parts, lambda j: _key_range(keys(j)), "timestamp range"))
    n = sum(r[0] for r in got)
    if n == 0:
        raise DataError("chronological: no interactions to cut")
    lo, hi = min(r[1] for r in got if r[0]), max(r[2] for r in got if r[0])
    cuts = np.round(np.cumsum(np.asarray(ratios, np.float64))[:2] * n).astype(np.int64)
    bounds = [None if c == 0 else _kth(n_parts, keys, int(c) - 1, lo, hi) for c in cuts]
    if bounds[0] is not None and (bounds[1] is None or bounds[1] < bounds[0]):
        bounds[1] = bounds[0]
    return [None if b is None else from_key(b, like) for b in bounds]


def _key_range(k: np.ndarray) -> tuple[int, int, int]:
    return len(k), int(k.min()) if len(k) else 0, int(k.max()) if len(k) else 0


def _kth(n_parts: int, keys: Callable[[int], np.ndarray], k: int, lo: int, hi: int) -> int:
    """The k-th smallest key (0-based) over every partition: each pass splits [lo, hi] into
    HIST_BINS integer bins and keeps the one holding rank k, until it is one value or small enough
    to collect (so ties, however many, end the search)."""
    below = 0
    while lo < hi:
        width = -(-(hi - lo + 1) // HIST_BINS)  # ceil, in Python ints: no overflow

        def bins(j: int, lo: int = lo, hi: int = hi, width: int = width) -> np.ndarray:
            v = keys(j)
            v = v[(v >= lo) & (v <= hi)]
            off = v.view(np.uint64) - np.uint64(lo % (1 << 64))  # v - lo, exact in uint64
            return np.bincount((off // np.uint64(width)).astype(np.int64), minlength=HIST_BINS)

        hist = sum(partition_map(n_parts, bins, "cut-time histogram"))
        b = int(np.searchsorted(np.cumsum(hist), k - below, side="right"))
        below += int(hist[:b].sum())
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width - 1)
        if lo < hi and hist[b] <= COLLECT_MAX:
            def take(j: int, lo: int = lo, hi: int = hi) -> np.ndarray:
                v = keys(j)
                return v[(v >= lo) & (v <= hi)]

            values = np.sort(np.concatenate(list(partition_map(n_parts, take, "cut-time values"))))
            return int(values[k - below])
    return lo
