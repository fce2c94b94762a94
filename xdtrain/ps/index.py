"""Exact int64 id -> row position map, vectorised.

Backed by pandas' Int64HashTable (a khash open-addressing table in C): a batched lookup of
64k ids costs about 1-2 ms here, against ~30 ms for np.searchsorted on a sorted 2M array and
far more for a Python dict. The table cannot delete keys, so eviction rebuilds it from the
surviving ids (eviction is rare and already O(rows) because rows are compacted).
"""

from __future__ import annotations

import numpy as np
from pandas._libs.hashtable import Int64HashTable


class IdIndex:
    """Maps int64 ids to int64 positions; missing ids look up as -1."""

    def __init__(self, capacity_hint: int = 0) -> None:
        self._ht = Int64HashTable(max(int(capacity_hint), 16))
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Positions of `ids` (int64), -1 where an id is absent."""
        if len(ids) == 0:
            return np.empty(0, dtype=np.int64)
        return np.asarray(self._ht.lookup(np.ascontiguousarray(ids, dtype=np.int64)), dtype=np.int64)

    def insert(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Add new, distinct ids (absent from the index) at the given positions."""
        if len(ids):
            self._ht.map_keys_to_values(
                np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(positions, dtype=np.int64)
            )
            self._n += len(ids)

    def reset(self, ids: np.ndarray) -> None:
        """Rebuild so that ids[i] maps to position i (after compaction or a bulk load)."""
        self._ht = Int64HashTable(max(len(ids), 16))
        self._n = 0
        self.insert(ids, np.arange(len(ids), dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self._ht.sizeof())
