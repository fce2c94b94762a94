"""Shared sequence encoders (backbones), losses and negative sampling.

The backbone contract (GRU4Rec, SASRec, BERT4Rec share it, so every method can use any of them):

    states = backbone(x, mask)          # x: [B, T, d] item embeddings, mask: [B, T] bool (True = real item)
    states.shape == (B, T, d)           # one user state per position; padding positions are zeros
    u = last_state(states, mask)        # [B, d]: the state at each row's last real position
    u = backbone.user_state(x, mask)    # [B, d]: the state that scores the *next* item (inference)

Backbones never own item embedding tables: the embeddings come from the parameter server or a
local `torch.nn.Embedding`, and the caller scores items with a dot product against the same table.
Only item-independent parameters live in a backbone (positions, attention, GRU, BERT4Rec's [MASK]).

Padding convention for the whole project: RIGHT padding. Row b holds its (most recent, at most
`max_len`) items oldest first at positions 0 .. len_b - 1; positions len_b .. T - 1 are padding
(`mask` False; item id 0 in local tables). Why right padding:
  * positions are plain indices, so the same items with more trailing padding get the same
    positional embeddings, and a state at position t depends only on items 0..t (prefix-consistent);
  * trailing padding can never reach a real position of a causal model (GRU, causal attention);
  * bidirectional attention masks padding keys explicitly.
Results at real positions are therefore identical whatever the amount of padding (tested).
"""

from typing import Protocol

from torch import nn

from xdtrain.nn.bert4rec import BERT4Rec
from xdtrain.nn.gru4rec import GRU4Rec
from xdtrain.nn.layers import last_state
from xdtrain.nn.sasrec import SASRec

__all__ = ["BERT4Rec", "BackboneConfig", "GRU4Rec", "SASRec", "last_state", "make_backbone"]


class BackboneConfig(Protocol):
    """What `make_backbone` reads from a model config (SeqRec's, the reference trainer's)."""

    backbone: str  # sasrec | gru4rec | bert4rec
    d: int
    max_len: int
    layers: int
    heads: int
    dropout: float


def make_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.backbone == "sasrec":
        return SASRec(cfg.d, cfg.max_len, cfg.layers, cfg.heads, cfg.dropout)
    if cfg.backbone == "bert4rec":
        return BERT4Rec(cfg.d, cfg.max_len, cfg.layers, cfg.heads, cfg.dropout)
    return GRU4Rec(cfg.d, layers=cfg.layers, dropout=cfg.dropout)
