"""SASRec encoder (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).

Input item embeddings M_{s_i} come from outside (PS or a local table); the encoder adds learned
positions P_i (sec. III-B, "Ê_i = M_{s_i} + P_i"), then stacks blocks of causal self-attention and
a point-wise FFN, each as g(x) = x + Dropout(g(LayerNorm(x))) (sec. III-C/D), and a final layer norm.
The prediction r_{i,t} = F_t · M_i (eq. 6, shared item embedding) is the caller's dot product.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from xdtrain.nn.layers import (
    PositionalEmbedding,
    TransformerBlock,
    check_inputs,
    keep_last,
    last_state,
)


class SASRec(nn.Module):
    """Causal self-attention over the item sequence; `forward` -> [B, T, d] states (F_t per position)."""

    def __init__(self, d: int = 50, max_len: int = 200, blocks: int = 2, heads: int = 1, dropout: float = 0.2,
                 scale_input: bool = True):
        super().__init__()
        self.d = d
        self.max_len = max_len
        # The authors' code multiplies item embeddings by sqrt(d) before adding positions; kept so that
        # embeddings initialised at the usual small scale are not drowned by the positional term.
        self.input_scale = math.sqrt(d) if scale_input else 1.0
        self.pos = PositionalEmbedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, heads, d, dropout, "relu", pre_norm=True) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(d, eps=1e-8)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask, self.d, self.max_len)
        keep = mask.unsqueeze(-1).to(x.dtype)
        h = self.drop(x * self.input_scale + self.pos(x.shape[1])) * keep
        for block in self.blocks:
            h = block(h, None) * keep  # causal  # padding rows stay zero; real rows never read them anyway
        return self.norm(h) * keep

    def user_state(self, x: Tensor, mask: Tensor) -> Tensor:
        """[B, d]: F at the last real position, which scores the next item (eq. 6)."""
        if x.shape[1] > self.max_len:  # a longer history: keep each row's most recent max_len items
            x, mask = keep_last(x, mask, self.max_len)
        return last_state(self.forward(x, mask), mask)

