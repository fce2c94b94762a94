"""GRU4Rec encoder (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks", 2016).

A GRU reads the item embeddings in order from a zero initial state; its hidden state after item t
is the user state at t. With right padding, trailing padding never reaches a real position.
The original's output layer scores items against the item embeddings; here that is the caller's
dot product with the shared table, like the other backbones.
"""

from __future__ import annotations

from torch import Tensor, nn

from xdtrain.nn.layers import check_inputs, last_state


class GRU4Rec(nn.Module):
    """Stacked GRU over the sequence; `forward` -> [B, T, d] hidden states (projected back to d)."""

    def __init__(self, d: int = 64, hidden: int | None = None, layers: int = 1, dropout: float = 0.25):
        super().__init__()
        self.d = d
        hidden = hidden or d
        self.drop_in = nn.Dropout(dropout)
        between = dropout if layers > 1 else 0.0  # dropout between stacked layers only
        self.gru = nn.GRU(d, hidden, num_layers=layers, batch_first=True, dropout=between)
        self.drop_out = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, d) if hidden != d else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask, self.d)
        keep = mask.unsqueeze(-1).to(x.dtype)
        h, _ = self.gru(self.drop_in(x) * keep)
        return self.proj(self.drop_out(h)) * keep

    def user_state(self, x: Tensor, mask: Tensor) -> Tensor:
        """[B, d]: the hidden state after the last real item."""
        return last_state(self.forward(x, mask), mask)
