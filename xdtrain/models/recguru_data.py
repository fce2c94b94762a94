"""RecGURU's batches: per-domain train sequences -> encoder, decoder and CDSRec tensors (raw item ids).

Every id tensor holds raw item ids of one domain, PAD_ID (-1) for padding and EOS_ID (-2) for the
[eos] token (a dense vector per domain, not a PS row), right-padded (the project's convention; the
encoder masks padding keys, so where the padding sits does not change h). For a user's last N train
items x_1..x_L (spec sec. 2.5):

    enc      x_1 .. x_L, [eos]           the GUR h is the encoder state at [eos]
    dec_in   [eos], x_1 .. x_{L-1}       reconstruction, teacher forcing ([eos] doubles as BOS)
    dec_out  x_1 .. x_L                  rec_neg [B, T, K]: sampled-softmax negatives per position
    rec_in   x_1 .. x_{L-1}              CDSRec (causal); rec_out x_2 .. x_L, bpr_neg [B, T, K]
    gur      x_1 .. x_c, [eos]           the GUR CDSRec is trained with; rec_sup marks the positions
                                         supervised: targets after the cut c only (gur_train_mode)

Negatives are uniform over the domain's catalogue and never among the user's train items in that
domain (the stream holds nothing else: held-out targets are unknown to training by construction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from xdtrain.nn.negatives import uniform_negatives
from xdtrain.nn.sparse import PAD_ID

EOS_ID = -2
GUR_MODES = ("cut", "last", "full")


def pad_ids(seqs: Sequence[np.ndarray], width: int | None = None) -> Tensor:
    """[B, T] int64, right-padded with PAD_ID (T = the longest row, or `width`)."""
    T = width if width is not None else max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), max(T, 1)), PAD_ID, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def with_eos(seqs: Sequence[np.ndarray]) -> Tensor:
    return pad_ids([np.append(np.asarray(s, np.int64), EOS_ID) for s in seqs])


class DomainIndex:
    """A domain's catalogue: raw ids <-> dense 1..n (0 = padding), for negative sampling."""

    def __init__(self, item_ids: np.ndarray) -> None:
        self.raw = np.unique(np.asarray(item_ids, dtype=np.int64))
        self.n = len(self.raw)

    def dense(self, raw: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.raw, raw)
        ok = (pos < self.n) & (self.raw[np.minimum(pos, self.n - 1)] == raw)
        if not ok.all():
            raise KeyError(f"item ids {np.asarray(raw)[~ok][:5].tolist()} are not in the domain's catalogue")
        return pos + 1

    def negatives(self, seqs: Sequence[np.ndarray], shape: tuple[int, int, int], gen: torch.Generator) -> Tensor:
        """[B, T, K] raw ids drawn uniformly, avoiding each row's own items (`seqs`, raw)."""
        B, T, K = shape
        seen = pad_ids([self.dense(np.asarray(s, np.int64)) for s in seqs]).clamp(min=0)
        dense = uniform_negatives(self.n, (B, T * K), exclude=seen, generator=gen)
        return torch.from_numpy(self.raw[(dense - 1).numpy()]).view(B, T, K)


def reconstruction_tensors(seqs: list[np.ndarray], index: DomainIndex, k: int, gen: torch.Generator) -> dict:
    dec_out = pad_ids(seqs)
    dec_in = pad_ids([np.concatenate([[EOS_ID], s[:-1]]).astype(np.int64) for s in seqs], dec_out.shape[1])
    neg = index.negatives(seqs, (len(seqs), dec_out.shape[1], k), gen)
    return {"dec_in": dec_in, "dec_out": dec_out, "rec_neg": neg}


def cuts(lengths: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Items of each row the training GUR sees: `cut` a uniform c in 1..L-1, `last` L-1, `full` L."""
    if mode == "full":
        return lengths.copy()
    if mode == "last":
        return np.maximum(lengths - 1, 1)
    if mode == "cut":
        return np.maximum(1, (rng.random(len(lengths)) * np.maximum(lengths - 1, 1)).astype(np.int64) + 1)
    raise ValueError(f"gur_train_mode: unknown {mode!r}; expected one of {GUR_MODES}")


def recommendation_tensors(seqs: list[np.ndarray], index: DomainIndex, k: int, mode: str,
                           rng: np.random.Generator, gen: torch.Generator) -> dict:
    """CDSRec inputs and targets; position t (0-based) of row b predicts x_{t+2} and is supervised
    when x_{t+2} lies after the cut (t + 2 > c), so the GUR never holds a supervised target."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    c = cuts(lengths, mode, rng)
    rec_in = pad_ids([s[:-1] for s in seqs])
    T = rec_in.shape[1]
    rec_out = pad_ids([s[1:] for s in seqs], T)
    t = np.arange(T)[None, :]
    sup = t < (lengths - 1)[:, None]
    if mode != "full":  # `full` (the authors' code) supervises every position: the GUR holds the targets
        sup &= t + 2 > c[:, None]
    return {"rec_in": rec_in, "rec_out": rec_out, "rec_sup": torch.from_numpy(sup),
            "gur": with_eos([s[:n] for s, n in zip(seqs, c)]), "cut": torch.from_numpy(c),
            "bpr_neg": index.negatives(seqs, (len(seqs), T, k), gen)}
