"""Sampled GAT training inside Ray Train workers: each worker loads the saved graph itself, samples its
own seeds, and trains on PS-backed features held by PS shard actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph import GraphBuildConfig, run_build_graph

pytestmark = pytest.mark.ray


def test_sampled_training_in_ray_train_workers(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from xdtrain.ps import OptimizerSpec, PSClient, TableSpec

    # Defined here so that Ray pickles it by value (the test module is not importable on workers).
    def train_loop(config: dict) -> None:
        import dgl
        import ray.train
        import ray.train.torch
        import torch

        from graph import (
            GATEncoder,
            NeighbourSampler,
            PSFeatures,
            load_graph,
            seed_batches,
            seed_everything,
            worker_seeds,
        )

        torch.set_num_threads(1)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        graph = load_graph(config["graph"])  # memory-mapped: one copy per host
        seed_everything(0, rank)
        seeds = worker_seeds(graph.num_nodes, rank, world, epoch=0, seed=5)
        feats = PSFeatures(config["ps"], "ent", graph)
        model = ray.train.torch.prepare_model(GATEncoder(8, 16, 4, heads=2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sampler = NeighbourSampler(graph, [4, 4])
        src, dst, _ = graph.edge_list()
        losses, valid = [], True
        for batch_seeds in seed_batches(seeds, 16, drop_last=True):
            batch = sampler.sample_batch(batch_seeds)
            for block in batch.blocks:  # every sampled edge is a graph edge
                u, v = block.edges()
                eid = block.edata[dgl.EID].numpy()
                valid &= bool(np.array_equal(src[eid], block.srcdata[dgl.NID][u.long()].numpy()))
                valid &= bool(np.array_equal(dst[eid], block.dstdata[dgl.NID][v.long()].numpy()))
            fb = feats.lookup(batch.input_nodes, train=True)
            loss = model(batch.blocks, fb.x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            feats.push(fb)
            opt.step()
            losses.append(float(loss))
        config["ps"].flush()
        out = {"rank": rank, "world": world, "seeds": seeds.tolist(), "losses": losses, "valid": valid}
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))

    rng = np.random.default_rng(0)
    n = 600
    cols = {"head": rng.integers(0, 90, n), "tail": rng.integers(0, 90, n),
            "relation": pa.array(rng.integers(0, 3, n), pa.int32())}
    pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    summary = run_build_graph(GraphBuildConfig(triplets=str(tmp_path / "t.parquet"),
                                               out=str(tmp_path / "graph"), progress=False))
    ps = PSClient(2)
    try:
        ps.create_table(TableSpec("ent", 8, optimizer=OptimizerSpec("sgd", lr=0.5)))
        out = tmp_path / "ranks"
        out.mkdir()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"graph": summary["out"], "ps": ps, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="graph"),
        )
        trainer.fit()
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(r["valid"] and r["world"] == 2 for r in ranks)
        shares = [set(r["seeds"]) for r in ranks]
        assert not shares[0] & shares[1]  # each worker on its own seeds
        n_nodes = summary["num_nodes"]
        assert len(shares[0] | shares[1]) == n_nodes - n_nodes % 2
        assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) > 0  # equal steps, as DDP needs
        assert all(np.isfinite(r["losses"]).all() for r in ranks)
        assert ps.num_rows("ent") > 0  # both workers' gradients reached the shard actors
    finally:
        ps.close()
