"""BERT4Rec encoder (Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder
Representations from Transformer", CIKM 2019).

Item embeddings come from outside; the encoder owns what is not an item: the [MASK] token embedding,
learned positions, the bidirectional transformer layers (sec. 3.3, post-norm, GELU FFN of 4d) and the
prediction transform GELU(h W^P + b^P) of eq. 7, whose output the caller dots with the item table.
Training is the Cloze task (sec. 3.6): some real positions are replaced by [MASK] (`masked`) and the
states there predict the hidden items. Inference appends one [MASK] after the last item (`user_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdtrain.nn.layers import PositionalEmbedding, TransformerBlock, check_inputs, keep_last, key_mask


class BERT4Rec(nn.Module):
    """Bidirectional self-attention with a learned [MASK]; `forward` -> [B, T, d] states."""

    def __init__(self, d: int = 64, max_len: int = 200, layers: int = 2, heads: int = 2, dropout: float = 0.1,
                 ffn_dim: int | None = None):
        super().__init__()
        self.d = d
        self.max_len = max_len
        self.mask_token = nn.Parameter(torch.empty(d))
        self.pos = PositionalEmbedding(max_len, d)
        self.norm_in = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(d, heads, ffn_dim or 4 * d, dropout, "gelu", pre_norm=False, eps=1e-12)
            for _ in range(layers)
        )
        self.out = nn.Linear(d, d)  # W^P, b^P of eq. 7
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, mask: Tensor, masked: Tensor | None = None) -> Tensor:
        """`masked` [B, T] bool marks real positions whose item is replaced by [MASK]."""
        check_inputs(x, mask, self.d, self.max_len)
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        keep = mask.unsqueeze(-1).to(x.dtype)
        h = self.drop(self.norm_in(x + self.pos(x.shape[1]))) * keep
        allowed = key_mask(mask)
        for layer in self.layers:
            h = layer(h, allowed) * keep
        return F.gelu(self.out(h)) * keep

    def user_state(self, x: Tensor, mask: Tensor) -> Tensor:
        """[B, d]: the state of a [MASK] appended after each row's last item (keeps max_len - 1 items)."""
        if x.shape[1] >= self.max_len:
            x, mask = keep_last(x, mask, self.max_len - 1)
        B, T, _ = x.shape
        lengths = mask.sum(dim=1)
        x = torch.cat([x, x.new_zeros(B, 1, self.d)], dim=1)
        slot = torch.arange(T + 1, device=x.device) == lengths.unsqueeze(1)  # [B, T+1]: the [MASK] position
        mask = torch.cat([mask, mask.new_zeros(B, 1)], dim=1) | slot
        states = self.forward(x, mask, masked=slot)
        return states[torch.arange(B, device=x.device), lengths]
