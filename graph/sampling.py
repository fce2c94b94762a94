"""Neighbour sampling over an `EntityGraph`: per-layer fanouts, optionally per relation, yielding DGL blocks.

    sampler = NeighbourSampler(graph, fanouts=[10, 10])                      # 2 layers
    sampler = NeighbourSampler(graph, fanouts=[5, 5], relation_aware=True)   # up to 5 per relation
    batch = sampler.sample_batch(seed_nodes)    # blocks[0]: the input layer; blocks[-1] ends at the seeds

`fanouts[i]` is the fanout of layer i (input layer first, DGL's convention; -1 = all in-edges).
With `relation_aware`, a fanout is per edge type: an int applies to every type, a list gives one
value per type (`graph.etype_names` order; 0 skips a type). Every block carries the global ids
`srcdata/dstdata[dgl.NID]` and `edata[dgl.EID]`; with `edge_types` (needed by R-GCN; on by default
when relation_aware) also `edata["rel"]`, the int64 edge type, looked up from the edge id (a binary
search over the type ranges: it costs about as much as the sampling itself, so GAT goes without).

Inside Ray Train each worker loads the graph itself (memory-mapped, shared on a host), takes its
own seeds with `worker_seeds(..., rank, world_size, epoch)` and samples them with its own RNG
stream (`seed_everything(seed, rank)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import dgl
import numpy as np
import torch

from .store import EntityGraph

Fanout = int | list[int]


@dataclass
class SampledBatch:
    input_nodes: torch.Tensor  # dense ids of blocks[0]'s source nodes (whose features the model needs)
    seeds: torch.Tensor  # dense ids of the output nodes (blocks[-1]'s destination nodes)
    blocks: list[dgl.DGLGraph]


class NeighbourSampler(dgl.dataloading.BlockSampler):
    """Layer-wise in-edge sampling into blocks; usable directly or as a DGL DataLoader block sampler."""

    def __init__(self, graph: EntityGraph, fanouts: list[Fanout], relation_aware: bool = False,
                 replace: bool = False, edge_types: bool | None = None) -> None:
        super().__init__()
        if not fanouts:
            raise ValueError("fanouts: need at least one layer")
        self.graph, self.replace, self.relation_aware = graph, replace, relation_aware
        self.edge_types = relation_aware if edge_types is None else edge_types
        self.fanouts = [self._check(f, i) for i, f in enumerate(fanouts)]
        self._offsets = [int(x) for x in graph.etype_offsets]

    def _check(self, fanout: Fanout, layer: int):
        T = self.graph.num_etypes
        if isinstance(fanout, (list, tuple)):
            if not self.relation_aware:
                raise ValueError(f"fanouts[{layer}]: a per-relation list needs relation_aware=True")
            if len(fanout) != T:
                raise ValueError(f"fanouts[{layer}]: {len(fanout)} values for {T} edge types")
            return torch.tensor([int(f) for f in fanout], dtype=torch.int64)
        if self.relation_aware:
            return torch.full((T,), int(fanout), dtype=torch.int64)
        return int(fanout)

    @property
    def num_layers(self) -> int:
        return len(self.fanouts)

    def _frontier(self, g: dgl.DGLGraph, nodes: torch.Tensor, fanout) -> dgl.DGLGraph:
        if isinstance(fanout, torch.Tensor):
            return dgl.sampling.sample_etype_neighbors(
                g, nodes, self._offsets, fanout, replace=self.replace,
                copy_ndata=False, copy_edata=True, etype_sorted=True)
        return dgl.sampling.sample_neighbors(g, nodes, fanout, replace=self.replace,
                                             copy_ndata=False, copy_edata=True)

    def sample_blocks(self, g, seed_nodes, exclude_eids=None):
        """DGL's BlockSampler hook: (input nodes, output nodes, blocks), input layer first."""
        if exclude_eids is not None:
            raise NotImplementedError("exclude_eids is not supported")
        output_nodes = seed_nodes
        blocks = []
        for fanout in reversed(self.fanouts):
            frontier = self._frontier(g, seed_nodes, fanout)
            eid = frontier.edata[dgl.EID]  # graph edge ids (to_block would leave frontier-local ones)
            block = dgl.to_block(frontier, seed_nodes)
            block.edata[dgl.EID] = eid
            if self.edge_types:
                block.edata["rel"] = self.graph.edge_types(eid)
            seed_nodes = block.srcdata[dgl.NID]
            blocks.insert(0, block)
        return seed_nodes, output_nodes, blocks

    def sample_batch(self, seeds) -> SampledBatch:
        """Blocks for dense seed node ids (numpy or tensor; duplicates are removed, order kept)."""
        seeds = _unique_keep_order(torch.as_tensor(np.asarray(seeds)).to(self.graph.g.idtype))
        input_nodes, output_nodes, blocks = self.sample_blocks(self.graph.g, seeds)
        return SampledBatch(input_nodes, output_nodes, blocks)


def _unique_keep_order(x: torch.Tensor) -> torch.Tensor:
    uniq, inverse = torch.unique(x, return_inverse=True)
    if len(uniq) == len(x):
        return x
    first = torch.full((len(uniq),), len(x), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(x)), reduce="amin")
    return x[first.sort().values]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Give this worker its own sampling stream (DGL's and torch's RNGs)."""
    dgl.seed(int(seed) * 1009 + int(rank))
    torch.manual_seed(int(seed) * 1009 + int(rank))


def worker_seeds(seeds: np.ndarray | int, rank: int, world_size: int, epoch: int = 0, seed: int = 0,
                 shuffle: bool = True) -> np.ndarray:
    """This worker's share of the seed nodes for one epoch.

    All workers shuffle with the same (seed, epoch) stream, trim to a multiple of world_size (so
    every worker runs the same number of steps, as DDP needs), and take every world_size-th seed:
    the shares are disjoint and together cover the trimmed epoch. `seeds` may be a count (0..n-1).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    seeds = np.arange(seeds) if np.isscalar(seeds) else np.asarray(seeds)
    if shuffle:
        seeds = seeds[np.random.default_rng([int(seed), int(epoch)]).permutation(len(seeds))]
    usable = len(seeds) - len(seeds) % world_size
    return seeds[rank:usable:world_size]


def seed_batches(seeds: np.ndarray, batch_size: int, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Consecutive batches of `seeds`."""
    stop = len(seeds) - (len(seeds) % batch_size if drop_last else 0)
    for a in range(0, stop, batch_size):
        yield seeds[a : a + batch_size]
