"""Layer-wise full-graph inference for embedding refresh: every node, one layer at a time, in node chunks.

    summary = layerwise_inference(model, graph, features, "s3://bucket/emb/v7")
    table = xdtrain.ps.read_export("s3://bucket/emb/v7")      # id (raw entity id), vector

Layer l is computed for all nodes before layer l + 1, so each node's layer-l state is computed
once (per-seed 2-hop sampling would recompute shared neighbourhoods, and add sampling noise).
A chunk is a range of dense node ids holding at most `chunk_nodes` nodes and `chunk_edges`
in-edges (one hub may exceed it alone), so memory is bounded by the chunk, not the graph:
intermediate layers go to a float32 memory map in a scratch directory (local disk), and the last
layer streams to Parquet (`id`, `vector`) in the PS export layout: part files under a staging
name, `_MANIFEST.json` last, then one rename, so readers never see a partial or mixed version.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dgl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm.auto import tqdm

from xdtrain.outputs import AtomicFile, StagedDir, write_json_atomic

from .sampling import NeighbourSampler
from .store import EntityGraph

EXPORT_MANIFEST = "_MANIFEST.json"  # the layout `xdtrain.ps.read_export` reads


def node_chunks(indptr: np.ndarray, chunk_nodes: int, chunk_edges: int, lo: int = 0, hi: int | None = None
                ) -> Iterator[tuple[int, int]]:
    """Ranges [a, b) of dense node ids with <= chunk_nodes nodes and <= chunk_edges in-edges (>= 1 node)."""
    hi = len(indptr) - 1 if hi is None else hi
    a = lo
    while a < hi:
        by_edges = int(np.searchsorted(indptr, int(indptr[a]) + chunk_edges, side="right")) - 1
        b = min(hi, a + chunk_nodes, max(by_edges, a + 1))
        yield a, b
        a = b


def run_layer(model, layer: int, sampler: NeighbourSampler, inputs: Callable[[Tensor], Tensor], chunks,
              write: Callable[[int, int, Tensor], None], progress: bool = False, total: int = 0) -> int:
    """Layer `layer` for every node range in `chunks`: full in-neighbourhood block, inputs of its source
    nodes, one layer, `write(a, b, out)`. Returns the number of edges processed."""
    edges = 0
    bar = tqdm(total=total, desc=f"layer {layer}", unit="node", unit_scale=True, disable=not progress,
               mininterval=1.0)
    with torch.no_grad(), bar:
        for a, b in chunks:
            nodes = torch.arange(a, b, dtype=sampler.graph.g.idtype)
            _, _, (block,) = sampler.sample_blocks(sampler.graph.g, nodes)
            out = model.layer_forward(layer, block, inputs(block.srcdata[dgl.NID]))
            write(a, b, out)
            edges += block.num_edges()
            bar.update(b - a)
    return edges


def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """arr[idx] for a memory map, read in ascending row order (sequential pages), returned in idx order."""
    idx = idx.astype(np.int64)
    order = np.argsort(idx)
    out = np.empty((len(idx), arr.shape[1]), dtype=arr.dtype)
    out[order] = arr[idx[order]]
    return out


class _ExportWriter:
    """(id, vector) Parquet parts under a staging directory, published by `commit`."""

    def __init__(self, url: str, dim: int, rows_per_file: int, overwrite: bool) -> None:
        self.staged = StagedDir(url, "embeddings", replace=overwrite, replace_key="overwrite")
        self.fs, self.stage = self.staged.fs, self.staged.path
        self.dim, self.rows_per_file = dim, rows_per_file
        self.schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])
        self.files: list[dict] = []
        self._writer = self._handle = None
        self._rows = 0

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not np.isfinite(vectors).all():  # validate before publishing: never a NaN embedding
            bad = ids[~np.isfinite(vectors).all(1)][:5].tolist()
            raise ValueError(f"non-finite embeddings for ids {bad}")
        if self._writer is None:
            name = f"part-{len(self.files):05d}.parquet"
            self._handle = AtomicFile(f"{self.stage}/{name}", self.fs)
            self._writer = pq.ParquetWriter(self._handle.file, self.schema)
            self.files.append({"path": name, "rows": 0})
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        vec = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        batch = pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), vec], schema=self.schema)
        self._writer.write_batch(batch)
        self.files[-1]["rows"] += len(ids)
        if self.files[-1]["rows"] >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.commit()
            self._writer = self._handle = None

    def commit(self, table: str) -> None:
        self._close_file()
        rows = sum(f["rows"] for f in self.files)
        body = {"table": table, "dim": self.dim, "rows": rows, "files": self.files}
        write_json_atomic(f"{self.stage}/{EXPORT_MANIFEST}", body, self.fs, indent=1)
        self.staged.commit()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.discard()
            self._writer = self._handle = None
        self.staged.discard()


def layerwise_inference(model, graph: EntityGraph, features, out_url: str, *, chunk_nodes: int = 1 << 16,
                        chunk_edges: int = 1 << 21, scratch_dir: str | None = None,
                        rows_per_file: int = 1 << 22, table: str = "entity", overwrite: bool = False,
                        progress: bool = True) -> dict:
    """Final-layer embeddings of every node, written to `out_url` as (raw entity id, vector) Parquet."""
    model.eval()
    sampler = NeighbourSampler(graph, [-1], edge_types=model.needs_edge_types)
    N = graph.num_nodes
    writer = _ExportWriter(out_url, model.layer_dims[-1], rows_per_file, overwrite)
    scratch = Path(tempfile.mkdtemp(prefix="layerwise-", dir=scratch_dir))
    t0, edges, prev = time.time(), 0, None
    try:
        for layer in range(model.num_layers):
            chunks = node_chunks(graph.indptr, chunk_nodes, chunk_edges)
            if prev is None:
                def inputs(src: Tensor) -> Tensor:
                    return model.encode_input(features.lookup(src, train=False).x)
            else:
                def inputs(src: Tensor, prev=prev) -> Tensor:
                    return torch.from_numpy(_gather(prev, src.numpy()))
            if layer == model.num_layers - 1:
                def write(a: int, b: int, out: Tensor) -> None:
                    writer.write(graph.node_ids[a:b], out.numpy())
            else:
                cur = np.lib.format.open_memmap(scratch / f"layer{layer}.npy", mode="w+", dtype=np.float32,
                                                shape=(N, model.layer_dims[layer]))

                def write(a: int, b: int, out: Tensor, cur=cur) -> None:
                    cur[a:b] = out.numpy()
            edges += run_layer(model, layer, sampler, inputs, chunks, write, progress, N)
            if layer < model.num_layers - 1:
                cur.flush()
                prev = cur
        writer.commit(table)
    except BaseException:
        writer.abort()
        raise
    finally:
        del prev
        shutil.rmtree(scratch, ignore_errors=True)
    return {"out": out_url, "rows": N, "dim": model.layer_dims[-1], "files": len(writer.files),
            "edges_processed": edges, "seconds": round(time.time() - t0, 3)}
