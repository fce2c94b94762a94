"""GNN encoders over blocks: full-neighbourhood sample == full graph, layer-wise inference == sampled
forward, PS-backed features get their gradients, refresh output is atomic."""

from __future__ import annotations

import dgl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from graph import (
    FixedFeatures,
    GATEncoder,
    GraphBuildConfig,
    NeighbourSampler,
    PSFeatures,
    RGCNEncoder,
    build_graph,
    layerwise_inference,
    node_chunks,
)
from xdtrain.ps import LocalPS, OptimizerSpec, TableSpec, read_export

N_REL = 3
DIM = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(2)
    n_ent, n = 120, 700
    w = rng.pareto(1.0, n_ent) + 1
    p = w / w.sum()
    raw = np.sort(rng.choice(10**9, n_ent, replace=False))
    h, t, r = raw[rng.choice(n_ent, n, p=p)], raw[rng.choice(n_ent, n, p=p)], rng.integers(0, N_REL, n)
    path = tmp_path_factory.mktemp("g") / "t.parquet"
    table = pa.table({"head": pa.array(h), "relation": pa.array(r, pa.int32()), "tail": pa.array(t)})
    pq.write_table(table, path)
    graph = build_graph(GraphBuildConfig(triplets=str(path), out="unused", progress=False))
    # the reference: a plain DGL graph made straight from the triplets (forward + reverse edges)
    hd, td = graph.to_dense(h).astype(np.int64), graph.to_dense(t).astype(np.int64)
    ref = dgl.graph((np.concatenate([hd, td]), np.concatenate([td, hd])), num_nodes=graph.num_nodes)
    ref.edata["rel"] = torch.from_numpy(np.concatenate([r, r + N_REL]))
    x = torch.from_numpy(rng.standard_normal((graph.num_nodes, DIM)).astype(np.float32))
    return graph, ref, x


def models(graph):
    torch.manual_seed(0)
    return {"gat": GATEncoder(DIM, hidden_dim=16, out_dim=12, heads=4, out_heads=2).eval(),
            "rgcn": RGCNEncoder(DIM, graph.num_etypes, hidden_dim=16, out_dim=12, num_bases=2).eval()}


@pytest.mark.parametrize("name", ["gat", "rgcn"])
def test_full_neighbourhood_sample_equals_full_graph(data, name):
    graph, ref, x = data
    model = models(graph)[name]
    seeds = np.array([3, 0, 77, 41, graph.num_nodes - 1, 8])
    with torch.no_grad():
        full = model([ref, ref], x)[torch.from_numpy(seeds)]
        for fanout in (-1, int(graph.in_degrees().max())):  # all in-edges, or a fanout >= max degree
            batch = NeighbourSampler(graph, [fanout, fanout], edge_types=True).sample_batch(seeds)
            sampled = model(batch.blocks, x[batch.input_nodes.long()])
            torch.testing.assert_close(sampled, full, atol=1e-5, rtol=1e-5)
        # and sampling fewer neighbours does change the answer (the comparison can fail)
        batch = NeighbourSampler(graph, [2, 2], edge_types=True).sample_batch(seeds)
        assert not torch.allclose(model(batch.blocks, x[batch.input_nodes.long()]), full, atol=1e-3)


@pytest.mark.parametrize("name", ["gat", "rgcn"])
def test_layerwise_inference_equals_sampled_forward(data, name):
    graph, _, x = data
    model = models(graph)[name]
    url = f"memory://layerwise/{name}"
    summary = layerwise_inference(model, graph, FixedFeatures(x), url, chunk_nodes=9, chunk_edges=40,
                                  progress=False)
    assert summary["rows"] == graph.num_nodes and summary["edges_processed"] == 2 * graph.num_edges
    out = read_export(url)
    ids = out["id"].to_numpy()
    vec = np.stack(out["vector"].to_numpy(zero_copy_only=False))
    assert np.array_equal(ids, graph.node_ids)  # raw entity ids, every node once
    sampler = NeighbourSampler(graph, [-1, -1], edge_types=model.needs_edge_types)
    batch = sampler.sample_batch(np.arange(graph.num_nodes))
    with torch.no_grad():
        want = model(batch.blocks, x[batch.input_nodes.long()]).numpy()
    np.testing.assert_allclose(vec, want, atol=1e-5, rtol=1e-5)


def test_rgcn_asks_for_edge_types(data):
    graph, _, x = data
    batch = NeighbourSampler(graph, [2, 2]).sample_batch(np.array([0, 1]))
    assert "rel" not in batch.blocks[0].edata  # GAT's sampler skips the edge-type lookup
    with pytest.raises(KeyError, match="edge_types=True"):
        models(graph)["rgcn"](batch.blocks, x[batch.input_nodes.long()])


def test_node_chunks_bound_nodes_and_edges():
    indptr = np.array([0, 2, 3, 50, 51, 55, 56, 60])  # node 2 is a hub of 47 in-edges
    chunks = list(node_chunks(indptr, chunk_nodes=3, chunk_edges=5))
    assert chunks == [(0, 2), (2, 3), (3, 5), (5, 7)]
    for a, b in chunks:
        assert b - a <= 3 and (indptr[b] - indptr[a] <= 5 or b - a == 1)


def test_ps_features_push_row_gradients(data):
    graph, _, _ = data
    ps = LocalPS()
    ps.create_table(TableSpec("ent", DIM, optimizer=OptimizerSpec("sgd", lr=0.5)))
    feats = PSFeatures(ps, "ent", graph)
    model = models(graph)["gat"]
    batch = NeighbourSampler(graph, [3, 3]).sample_batch(np.array([1, 2, 3]))
    raw = graph.to_raw(batch.input_nodes)
    before = ps.pull("ent", raw).clone()
    fb = feats.lookup(batch.input_nodes, train=True)
    torch.testing.assert_close(fb.x, before)
    model(batch.blocks, fb.x).pow(2).sum().backward()
    grad = fb.rows["ent"].weight.grad.clone()
    assert grad.abs().sum() > 0
    assert feats.push(fb) == len(raw)
    after = ps.pull("ent", raw)
    order = np.searchsorted(fb.rows["ent"].ids.numpy(), raw)  # Rows are sorted by raw id
    torch.testing.assert_close(after, before - 0.5 * grad[order])
    untouched = graph.to_raw(np.setdiff1d(np.arange(graph.num_nodes), batch.input_nodes.numpy())[:5])
    assert ps.num_rows("ent") == len(raw)  # only the batch's rows were admitted
    assert len(untouched)


def test_layerwise_with_ps_features_and_atomic_publish(data, tmp_path):
    graph, _, _ = data
    ps = LocalPS()
    ps.create_table(TableSpec("ent", DIM))
    model = models(graph)["gat"]
    url = str(tmp_path / "emb")
    layerwise_inference(model, graph, PSFeatures(ps, "ent", graph), url, chunk_nodes=50, progress=False)
    first = read_export(url)
    x = ps.pull("ent", graph.node_ids)
    batch = NeighbourSampler(graph, [-1, -1]).sample_batch(np.arange(graph.num_nodes))
    with torch.no_grad():
        want = model(batch.blocks, x[batch.input_nodes.long()]).numpy()
    np.testing.assert_allclose(np.stack(first["vector"].to_numpy(zero_copy_only=False)), want, atol=1e-5)
    with pytest.raises(FileExistsError):
        layerwise_inference(model, graph, PSFeatures(ps, "ent", graph), url, progress=False)

    class Failing(FixedFeatures):
        calls = 0

        def lookup(self, nodes, train=False):
            Failing.calls += 1
            if Failing.calls > 3:
                raise RuntimeError("worker died")
            return super().lookup(nodes, train)

    with pytest.raises(RuntimeError, match="worker died"):
        layerwise_inference(model, graph, Failing(np.zeros((graph.num_nodes, DIM), np.float32)), url,
                            chunk_nodes=10, overwrite=True, progress=False)
    assert read_export(url).equals(first)  # the published version is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # no staging directory left behind
