"""Turn per-user item sequences into right-padded training tensors (see `xdtrain/nn/__init__.py`).

Sequences are 1-D integer arrays of item indices, oldest first, with 0 reserved for padding.
Two training tasks:
  * next item (SASRec, GRU4Rec): inputs s_1..s_{n-1}, targets s_2..s_n, predicted at every position;
  * Cloze (BERT4Rec, Sun et al. 2019 sec. 3.6): random positions are hidden behind [MASK] and predicted.
Each batch is only as long as its longest row, and `batch_order` can group rows of similar length,
which cuts padding work without changing any result at the real positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from xdtrain.nn.negatives import uniform_negatives


def pad_right(seqs: Sequence[np.ndarray], max_len: int) -> tuple[Tensor, Tensor]:
    """Keep each sequence's last `max_len` items; -> (ids [B, T] long, mask [B, T] bool), T = longest kept."""
    kept = [np.asarray(s[-max_len:] if max_len > 0 else s[:0], dtype=np.int64) for s in seqs]
    T = max((len(s) for s in kept), default=0)
    ids = np.zeros((len(kept), T), dtype=np.int64)
    for i, s in enumerate(kept):
        ids[i, : len(s)] = s
    lengths = np.fromiter((len(s) for s in kept), dtype=np.int64, count=len(kept))
    mask = np.arange(T)[None, :] < lengths[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask)


def next_item_batch(seqs: Sequence[np.ndarray], max_len: int) -> dict[str, Tensor]:
    """Inputs and shifted targets from the last max_len + 1 items of each sequence.

    -> inputs [B, T], targets [B, T] (item to predict after each position), mask [B, T].
    """
    windows = [np.asarray(s)[-(max_len + 1):] for s in seqs]
    inputs, mask = pad_right([w[:-1] for w in windows], max_len)
    targets, _ = pad_right([w[1:] for w in windows], max_len)
    return {"inputs": inputs, "targets": targets, "mask": mask}


def cloze_batch(seqs: Sequence[np.ndarray], max_len: int, mask_prob: float, rng: np.random.Generator,
                last_only_prob: float = 0.0) -> dict[str, Tensor]:
    """Masked-item batch from the last max_len items of each sequence.

    Each real position is hidden with probability `mask_prob` (at least one per row: the last item if the
    draw hid none). With probability `last_only_prob` a row hides only its last item, which mirrors the
    test-time task (BERT4Rec adds such samples, sec. 3.6).
    -> inputs [B, T] (original ids), mask, masked [B, T] bool, targets [B, T] (hidden ids, 0 elsewhere).
    """
    inputs, mask = pad_right(seqs, max_len)
    B, T = inputs.shape
    lengths = mask.sum(dim=1)
    masked = torch.from_numpy(rng.random((B, T)) < mask_prob) & mask
    last = torch.zeros_like(mask)
    last[torch.arange(B), (lengths - 1).clamp(min=0)] = lengths > 0
    only_last = torch.from_numpy(rng.random(B) < last_only_prob).unsqueeze(1)
    none = ~masked.any(dim=1, keepdim=True)
    masked = torch.where(only_last | none, last, masked)
    targets = torch.where(masked, inputs, torch.zeros_like(inputs))
    return {"inputs": inputs, "targets": targets, "mask": mask, "masked": masked}


def add_negatives(batch: dict[str, Tensor], seqs: Sequence[np.ndarray], num_items: int, k: int,
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Add `negatives` [B, T, k]: uniform item ids per position that the row's user never interacted
    with anywhere in `seqs` (their whole sequence, not just the window), as SASRec samples them."""
    seen, _ = pad_right(seqs, max(len(s) for s in seqs))
    B, T = batch["inputs"].shape
    negs = uniform_negatives(num_items, (B, T * k), exclude=seen, generator=generator)
    return {**batch, "negatives": negs.view(B, T, k)}


def batch_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                bucket: int = 50) -> list[np.ndarray]:
    """Shuffled row indices cut into batches. With `bucket` > 1, rows are shuffled, then sorted by length
    within chunks of `bucket` batches, so a batch holds rows of similar length (less padding); the
    batches themselves are shuffled again so lengths do not trend within an epoch."""
    order = rng.permutation(len(lengths))
    if bucket > 1 and len(order):
        chunk = batch_size * bucket
        chunks = np.split(order, range(chunk, len(order), chunk))
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
