"""Approximate inner-product top-k over one held catalogue: a faiss IVF index (`IndexIVFFlat`).

The catalogue is clustered into `nlist` ~ 4 sqrt(n) lists by k-means on a seeded sample; a query
scans the `nprobe` lists whose centroids score highest, so a query costs ~ nprobe / nlist of the exact
scan. The lists hold the full vectors, so a hit's score is its exact inner product and a search that
probes every list (`exact=True`) is the exact top-k.
"""

from __future__ import annotations

import math
import os

import numpy as np

TRAIN_PER_LIST = 40  # k-means sample rows per list (faiss warns below 39)
ADD_ROWS = 1 << 18  # rows added to the index per call: bounds the temporary copies


def faiss_threads(threads: int = 0) -> int:
    """OpenMP threads for faiss: `threads`, or by default at most 2 (it spins its threads; more than the
    cores a loaded host can give only wait on each other)."""
    return threads if threads > 0 else max(1, min(2, os.cpu_count() or 1))


def default_nlist(rows: int) -> int:
    """~4 sqrt(rows) lists, but no more than the sample can train (TRAIN_PER_LIST rows each)."""
    return max(1, min(rows // TRAIN_PER_LIST, int(round(4 * math.sqrt(rows)))))


class IVFIndex:
    """An inner-product IVF index over (ids [n] int64, vectors [n, d] float32), built once."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray, nlist: int = 0, seed: int = 0, threads: int = 0) -> None:
        import faiss  # only a reader that serves a large catalogue needs it

        self._faiss = faiss
        self.threads = faiss_threads(threads)
        faiss.omp_set_num_threads(self.threads)
        n, d = vecs.shape
        self.rows, self.dim = n, d
        self.nlist = nlist or default_nlist(n)
        self.quantizer = faiss.IndexFlatIP(d)  # kept referenced: the IVF index does not own it
        self.index = faiss.IndexIVFFlat(self.quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        sample = np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * self.nlist), replace=False)
        self.index.train(np.ascontiguousarray(vecs[np.sort(sample)], dtype=np.float32))
        for a in range(0, n, ADD_ROWS):
            self.index.add_with_ids(np.ascontiguousarray(vecs[a : a + ADD_ROWS], dtype=np.float32),
                                    np.ascontiguousarray(ids[a : a + ADD_ROWS], dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """The vectors and ids in the lists plus the centroids."""
        return self.rows * (self.dim * 4 + 8) + self.nlist * self.dim * 4

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [U, k], ids [U, k]) best first, from the `nprobe` best lists (every list: exact).
        Slots past the rows probed (fewer than k) hold id -1 and score -inf."""
        self._faiss.omp_set_num_threads(self.threads)
        params = self._faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, self.nlist)))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        scores[ids < 0] = -np.inf  # faiss marks an empty slot with -FLT_MAX
        return scores, ids
