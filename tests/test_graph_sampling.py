"""Neighbour sampling: blocks hold exactly the sampled edges, fanouts (per relation too), worker seeds."""

from __future__ import annotations

from collections import Counter

import dgl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from graph import GraphBuildConfig, NeighbourSampler, build_graph, seed_batches, seed_everything, worker_seeds

N_REL = 4


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    rng = np.random.default_rng(1)
    n_ent, n = 200, 2500
    w = rng.pareto(1.0, n_ent) + 1
    p = w / w.sum()
    h, t = rng.choice(n_ent, n, p=p), rng.choice(n_ent, n, p=p)
    path = tmp_path_factory.mktemp("g") / "t.parquet"
    pq.write_table(pa.table({"head": pa.array(h * 3 + 1, pa.int64()),
                             "relation": pa.array(rng.integers(0, N_REL, n), pa.int32()),
                             "tail": pa.array(t * 3 + 1, pa.int64())}), path)
    return build_graph(GraphBuildConfig(triplets=str(path), out="unused", progress=False))


def block_edges(block):
    """(global src, global dst, eid, rel) of every edge of a block."""
    u, v = block.edges()
    return (block.srcdata[dgl.NID][u.long()].numpy(), block.dstdata[dgl.NID][v.long()].numpy(),
            block.edata[dgl.EID].numpy(), block.edata["rel"].numpy())


def check_exact(graph, block, fanout_of):
    """Every block edge is a graph edge with its id, type and endpoints; per-destination counts match."""
    src, dst, etype = graph.edge_list()
    s, d, eid, rel = block_edges(block)
    assert len(set(eid.tolist())) == len(eid)  # without replacement: no edge twice
    assert np.array_equal(src[eid], s) and np.array_equal(dst[eid], d) and np.array_equal(etype[eid], rel)
    dst_nodes = block.dstdata[dgl.NID].numpy()
    assert np.array_equal(block.srcdata[dgl.NID][: len(dst_nodes)].numpy(), dst_nodes)  # dst first
    assert set(block.srcdata[dgl.NID].numpy()) == set(dst_nodes) | set(s)  # and nothing else
    got = Counter(zip(d.tolist(), rel.tolist()))
    for v in dst_nodes:
        in_types = etype[graph.eids[graph.indptr[v] : graph.indptr[v + 1]]]
        fanout_of(v, in_types, got)


def test_blocks_contain_exactly_the_sampled_edges(graph):
    seed_everything(3)
    sampler = NeighbourSampler(graph, [4, 3], edge_types=True)
    seeds = np.array([5, 0, 17, 199 % graph.num_nodes, 42])
    batch = sampler.sample_batch(seeds)
    assert batch.seeds.tolist() == seeds.tolist()
    assert np.array_equal(batch.blocks[1].dstdata[dgl.NID].numpy(), seeds)
    assert torch.equal(batch.blocks[0].dstdata[dgl.NID], batch.blocks[1].srcdata[dgl.NID])
    assert torch.equal(batch.input_nodes, batch.blocks[0].srcdata[dgl.NID])

    for block, k in zip(batch.blocks, [4, 3]):
        def per_node(v, in_types, got, k=k):
            n = sum(c for (dv, _), c in got.items() if dv == v)
            assert n == min(k, len(in_types))
        check_exact(graph, block, per_node)


def test_full_fanout_takes_every_in_edge(graph):
    sampler = NeighbourSampler(graph, [-1])
    seeds = np.arange(0, graph.num_nodes, 7)
    (block,) = sampler.sample_batch(seeds).blocks
    want = np.concatenate([graph.eids[graph.indptr[v] : graph.indptr[v + 1]] for v in seeds])
    assert sorted(block.edata[dgl.EID].tolist()) == sorted(want.tolist())


def test_relation_aware_fanouts(graph):
    seed_everything(4)
    T = graph.num_etypes
    per_type = [2, 0, 1, 3] * 2  # forward types then their reverses
    sampler = NeighbourSampler(graph, [per_type, 2], relation_aware=True)
    batch = sampler.sample_batch(np.arange(0, 60, 3))

    def exact(v, in_types, got, k):
        have = Counter(in_types.tolist())
        for t in range(T):
            assert got.get((v, t), 0) == min(k[t], have.get(t, 0)), (v, t)

    check_exact(graph, batch.blocks[0], lambda v, it, got: exact(v, it, got, per_type))
    check_exact(graph, batch.blocks[1], lambda v, it, got: exact(v, it, got, [2] * T))
    with pytest.raises(ValueError, match="relation_aware"):
        NeighbourSampler(graph, [[1] * T])
    with pytest.raises(ValueError, match="edge types"):
        NeighbourSampler(graph, [[1, 2]], relation_aware=True)


@pytest.mark.filterwarnings("ignore:Dataloader CPU affinity")
def test_duplicate_seeds_and_dataloader(graph):
    sampler = NeighbourSampler(graph, [3, 3])
    assert sampler.sample_batch(np.array([4, 9, 4, 1, 9])).seeds.tolist() == [4, 9, 1]
    loader = dgl.dataloading.DataLoader(graph.g, torch.arange(20, dtype=torch.int32), sampler, batch_size=8)
    batches = list(loader)
    assert [len(out) for _, out, _ in batches] == [8, 8, 4]


def test_sampling_is_seeded_per_worker(graph):
    sampler = NeighbourSampler(graph, [2])
    seeds = np.arange(0, 100)

    def run(seed, rank):
        seed_everything(seed, rank)
        return sampler.sample_batch(seeds).blocks[0].edata[dgl.EID].tolist()

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)


def test_worker_seeds_partition_each_epoch():
    shares = [worker_seeds(103, r, 4, epoch=2, seed=9) for r in range(4)]
    assert {len(s) for s in shares} == {25}
    union = np.concatenate(shares)
    assert len(set(union.tolist())) == 100 and set(union.tolist()) <= set(range(103))
    assert not np.array_equal(worker_seeds(103, 0, 4, epoch=3, seed=9), shares[0])
    assert np.array_equal(worker_seeds(103, 1, 4, epoch=2, seed=9), shares[1])
    assert np.array_equal(worker_seeds(np.arange(10), 0, 1, shuffle=False), np.arange(10))
    assert [len(b) for b in seed_batches(np.arange(10), 4)] == [4, 4, 2]
    assert [len(b) for b in seed_batches(np.arange(10), 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError):
        worker_seeds(10, 4, 4)
