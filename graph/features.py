"""Input node features for the GNN: fixed (e.g. text embeddings) or trained rows of a PS table.

Both answer `lookup(nodes, train)` with a `FeatureBatch` for a batch's input nodes (dense ids):

    fb = features.lookup(batch.input_nodes, train=True)
    loss = objective(model(batch.blocks, fb.x)); loss.backward()
    features.push(fb)            # PS: the row gradients go to the PS optimizer; fixed: nothing

`PSFeatures` keys the PS table by *raw* entity id (`graph.node_ids`), so the same rows serve any
other model that names entities, and a rebuilt graph (new dense ids) keeps its trained features.
It uses the model<->PS contract of `xdtrain.nn.sparse` (`pull_rows` / `push_grads`) and works with
`LocalPS` or `PSClient` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdtrain.nn.sparse import Rows, pull_rows, push_grads

from .store import EntityGraph


@dataclass
class FeatureBatch:
    x: Tensor  # [len(nodes), dim]
    rows: dict[str, Rows] | None = None  # the PS rows behind x (their .weight collects gradients)


def _np(nodes) -> np.ndarray:
    if isinstance(nodes, Tensor):
        return nodes.numpy()
    return np.asarray(nodes)


class FixedFeatures:
    """A fixed [N, dim] array indexed by dense node id (a numpy memmap keeps it on disk)."""

    def __init__(self, values: np.ndarray | Tensor) -> None:
        self.values = values.numpy() if isinstance(values, Tensor) else values
        if self.values.ndim != 2:
            raise ValueError(f"features must be [num_nodes, dim], got shape {self.values.shape}")

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def lookup(self, nodes, train: bool = False) -> FeatureBatch:
        idx = _np(nodes).astype(np.int64)
        return FeatureBatch(torch.from_numpy(np.ascontiguousarray(self.values[idx], dtype=np.float32)))

    def push(self, batch: FeatureBatch, scale: float = 1.0) -> int:
        return 0


class PSFeatures:
    """Rows of PS table `table`, keyed by raw entity id; trained through `push`."""

    def __init__(self, ps: Any, table: str, graph: EntityGraph) -> None:
        self.ps, self.table, self.graph = ps, table, graph
        self._dim = int(ps.spec(table).dim)

    @property
    def dim(self) -> int:
        return self._dim

    def lookup(self, nodes, train: bool = False) -> FeatureBatch:
        raw = self.graph.to_raw(_np(nodes))
        if not train:
            return FeatureBatch(self.ps.pull(self.table, raw).to(torch.float32))
        rows = pull_rows(self.ps, {self.table: raw})
        return FeatureBatch(rows[self.table](torch.from_numpy(raw)), rows)

    def push(self, batch: FeatureBatch, scale: float = 1.0) -> int:
        """Send the row gradients of a training lookup to the PS; returns rows pushed."""
        return push_grads(self.ps, batch.rows, scale) if batch.rows else 0
