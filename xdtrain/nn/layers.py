"""Pieces shared by the attention backbones: positions, masks, attention and transformer blocks.

All functions follow the project's right-padding convention (see `xdtrain/nn/__init__.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_inputs(x: Tensor, mask: Tensor, d: int, max_len: int | None = None) -> None:
    """Fail early, with the shapes in the message, instead of deep inside a matmul."""
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"expected item embeddings [B, T, {d}], got {tuple(x.shape)}")
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        got = f"{mask.dtype} {tuple(mask.shape)}"
        raise ValueError(f"expected a bool mask of shape {tuple(x.shape[:2])}, got {got}")
    if mask.shape[1] > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask is not right-padded: real items must come first in each row (see xdtrain.nn)")
    if max_len is not None and x.shape[1] > max_len:
        raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {max_len}")


def last_state(states: Tensor, mask: Tensor) -> Tensor:
    """[B, T, d] -> [B, d]: the state at each row's last real position (zeros for an empty row)."""
    t = torch.arange(mask.shape[1], device=mask.device)
    idx = torch.where(mask, t, -1).max(dim=1).values  # last True per row, -1 when none
    out = states[torch.arange(states.shape[0], device=states.device), idx.clamp(min=0)]
    return out * (idx >= 0).unsqueeze(-1).to(out.dtype)


def keep_last(x: Tensor, mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Keep each row's last `n` real items (right-padded, oldest first) -> (x [B, n, d], mask [B, n])."""
    lengths = mask.sum(dim=1)
    start = (lengths - n).clamp(min=0)
    idx = start.unsqueeze(1) + torch.arange(n, device=x.device)  # [B, n]
    valid = idx < lengths.unsqueeze(1)
    idx = idx.clamp(max=x.shape[1] - 1)
    out = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out * valid.unsqueeze(-1).to(out.dtype), valid


def key_mask(mask: Tensor) -> Tensor:
    """[B, T] padding mask -> [B, 1, 1, T] "may attend to this key" mask for bidirectional attention.

    A row with no real item may attend to every key, so no query row is fully masked (that gives NaN);
    its states are zeroed by the caller anyway.
    """
    empty = ~mask.any(dim=1, keepdim=True)
    return (mask | empty)[:, None, None, :]


class PositionalEmbedding(nn.Module):
    """Learned absolute positions 0..max_len-1 (right padding: position = index in the row)."""

    def __init__(self, max_len: int, d: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, d))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, T: int) -> Tensor:
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        return self.weight[:T]


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d_h)) V, heads concatenated, then W^O."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden size {d} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, allowed: Tensor | None) -> Tensor:
        """`allowed` [B, 1, 1, T] key mask (bidirectional), or None for causal attention. Causal needs no
        padding mask under right padding: a real position's earlier keys are all real items."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=allowed is None)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    """Point-wise two-layer network applied to every position alike."""

    def __init__(self, d: int, hidden: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Self-attention + point-wise FFN, each wrapped in residual, dropout and layer norm.

    pre_norm=True:  x + Dropout(f(LayerNorm(x)))   (SASRec, Kang & McAuley 2018, eq. 4 region)
    pre_norm=False: LayerNorm(x + Dropout(f(x)))   (BERT / BERT4Rec, Sun et al. 2019, eq. 5-6)
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, activation: str, pre_norm: bool,
                 eps: float = 1e-8):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(d, heads, dropout)
        self.ffn = FeedForward(d, ffn_dim, dropout, activation)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), allowed))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, allowed)))
        return self.norm2(x + self.drop(self.ffn(x)))
