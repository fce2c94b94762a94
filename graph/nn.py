"""GNN encoders over sampled blocks (or a whole graph): GAT (PEACE's entity encoder) and R-GCN, from dgl.nn.

Both share one shape, which sampled training and layer-wise inference rely on:

    h = model.encode_input(x)                    # per-node input projection (h0 = W_in x)
    for l, block in enumerate(blocks):
        h = model.layer_forward(l, block, h)     # one message-passing layer
    # == model(blocks, x)

A "block" may also be the whole graph (every layer on the same graph): full-graph propagation.
R-GCN reads edge types from `block.edata["rel"]` (the sampler sets it) and normalises each
message by 1 / in-degree of its destination in the block (the mean over sampled neighbours).
"""

from __future__ import annotations

import dgl
import torch.nn.functional as F
from dgl.nn import GATConv, RelGraphConv
from torch import Tensor, nn


class _Encoder(nn.Module):
    input: nn.Module
    layers: nn.ModuleList
    needs_edge_types = False  # whether blocks must carry edata["rel"] (NeighbourSampler(edge_types=True))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def encode_input(self, x: Tensor) -> Tensor:
        return self.input(x)

    def layer_forward(self, layer: int, block: dgl.DGLGraph, h: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, blocks: list[dgl.DGLGraph], x: Tensor) -> Tensor:
        """blocks[0] is the input layer; x holds blocks[0]'s source-node features."""
        if len(blocks) != self.num_layers:
            raise ValueError(f"{len(blocks)} blocks for a {self.num_layers}-layer encoder")
        h = self.encode_input(x)
        for layer, block in enumerate(blocks):
            h = self.layer_forward(layer, block, h)
        return h


class GATEncoder(_Encoder):
    """h0 = W_in x; hidden layers: `heads` heads of hidden_dim/heads, concatenated, ELU; the last layer:
    `out_heads` heads of out_dim, averaged. Residual connections carry each node's own state (its
    "self" term) even when sampling drops its self-loop or it has no in-edges."""

    def __init__(self, in_dim: int, hidden_dim: int = 64, out_dim: int = 64, num_layers: int = 2,
                 heads: int = 4, out_heads: int = 1, negative_slope: float = 0.2, feat_drop: float = 0.0,
                 attn_drop: float = 0.0, residual: bool = True, input_proj: bool = True) -> None:
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by heads {heads}")
        self.input = nn.Linear(in_dim, hidden_dim) if input_proj else nn.Identity()
        d = hidden_dim if input_proj else in_dim
        self.layers = nn.ModuleList()
        for layer in range(num_layers):
            last = layer == num_layers - 1
            n_heads, width = (out_heads, out_dim) if last else (heads, hidden_dim // heads)
            self.layers.append(GATConv(d, width, n_heads, feat_drop=feat_drop, attn_drop=attn_drop,
                                       negative_slope=negative_slope, residual=residual,
                                       activation=None if last else F.elu, allow_zero_in_degree=True))
            d = hidden_dim
        self.out_dim = out_dim
        self.layer_dims = [hidden_dim] * (num_layers - 1) + [out_dim]

    def layer_forward(self, layer: int, block: dgl.DGLGraph, h: Tensor) -> Tensor:
        out = self.layers[layer](block, h)  # [dst, heads, width]
        return out.mean(1) if layer == self.num_layers - 1 else out.flatten(1)


class RGCNEncoder(_Encoder):
    """R-GCN with basis decomposition: h_v' = act(sum_r sum_{u in N_r(v)} W_r h_u / |N(v)| + W_0 h_v + b)."""

    needs_edge_types = True

    def __init__(self, in_dim: int, num_etypes: int, hidden_dim: int = 64, out_dim: int = 64,
                 num_layers: int = 2, num_bases: int = 8, dropout: float = 0.0,
                 input_proj: bool = True) -> None:
        super().__init__()
        self.input = nn.Linear(in_dim, hidden_dim) if input_proj else nn.Identity()
        d = hidden_dim if input_proj else in_dim
        regularizer = "basis" if 0 < num_bases < num_etypes else None
        self.layers = nn.ModuleList()
        for layer in range(num_layers):
            last = layer == num_layers - 1
            width = out_dim if last else hidden_dim
            self.layers.append(RelGraphConv(d, width, num_etypes, regularizer=regularizer,
                                            num_bases=num_bases if regularizer else None, self_loop=True,
                                            activation=None if last else F.relu, dropout=dropout))
            d = width
        self.out_dim = out_dim
        self.layer_dims = [hidden_dim] * (num_layers - 1) + [out_dim]

    def layer_forward(self, layer: int, block: dgl.DGLGraph, h: Tensor) -> Tensor:
        _, dst = block.edges()
        deg = block.in_degrees().clamp(min=1).to(h.dtype)
        norm = (1.0 / deg)[dst.long()].unsqueeze(1)
        if "rel" not in block.edata:
            raise KeyError("R-GCN needs edge types on its blocks: sample with "
                           "NeighbourSampler(edge_types=True)")
        return self.layers[layer](block, h, block.edata["rel"].long(), norm)
