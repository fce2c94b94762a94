"""PreRec's data side: training batches from user sequences, eval rows, seen/unseen flags
(domain-balanced sampling: `xdtrain.data.sampler`).

Training rows are per-(user, domain) sequences as `xdtrain.data.sequences.build_sequences` writes
them (user_id, domain, items, timestamps; oldest first). A row's last `max_len + 1` items give
`max_len` next-item samples at once (the causal encoder reads every prefix in one pass): sample t
has history w_0..w_t and target w_{t+1} (code: history <= 64 items, target's day for popularity).

`build_batch` returns tensors over the batch's *unique* (domain, item) pairs, so text vectors and
PS rows are gathered once per item, not once per occurrence:

    text  [U, text_dim]   frozen f_BERT(X_j) of each unique item          key  [U] PS id of its offset row
    hist  [B, T] -> U     input items w_0..w_{T-1} (right-padded)          mask [B, T]
    dom   [B]             domain index of each row                         tmask [B, T] positions trained
    target [N] -> U, neg [N, K] -> U, tdom [N]: the N trained positions (row-major order of tmask)
    pop_pos [N, C], pop_neg [N, K, C]: popularity factors at the target's day (negatives: same day)

Negatives: K uniform draws, with replacement, from the whole catalogue of the target's own
domain (supplement App. E; code `self_neg=1`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from xdtrain.data.popularity import PopularityIndex, days_of
from xdtrain.data.schemas import DataError
from xdtrain.data.sequences import first_samples as first_samples  # re-exported: incremental fine-tuning
from xdtrain.data.splits import splitmix64
from xdtrain.text.cache import ItemVectors

_MASK63 = np.uint64((1 << 63) - 1)


# ---------------------------------------------------------------- ids of the offset table


def offset_keys(domain: str, item_ids: np.ndarray) -> np.ndarray:
    """PS ids of the per-(domain, item) offsets eps^v: the same item id in two domains is two rows."""
    salt = np.uint64(int.from_bytes(hashlib.blake2b(str(domain).encode(), digest_size=8).digest(), "little"))
    ids = np.asarray(item_ids, dtype=np.int64).view(np.uint64)
    return (splitmix64(ids ^ splitmix64(np.array([salt]))) & _MASK63).astype(np.int64)


# ---------------------------------------------------------------- list columns


def _lists(rows: pa.Table, col: str) -> tuple[np.ndarray, np.ndarray]:
    if col not in rows.schema.names:
        raise DataError(f"sequence rows: missing column '{col}' (found: {', '.join(rows.schema.names)})")
    arr = rows.column(col).combine_chunks() if isinstance(rows, pa.Table) else rows.column(col)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, np.asarray(arr.flatten().to_numpy(zero_copy_only=False))


def _domains(rows: pa.Table) -> np.ndarray:
    return np.asarray(pc.cast(rows.column("domain"), pa.string()).to_numpy(zero_copy_only=False), dtype=object)


def _windows(offsets: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each row's last `keep` values."""
    lengths = np.diff(offsets)
    n = np.minimum(lengths, keep)
    return offsets[1:] - n, n


# ---------------------------------------------------------------- training batches


def build_batch(rows: pa.Table, rng: np.random.Generator, *, domains: Sequence[str], text: ItemVectors,
                popularity: PopularityIndex | None, max_len: int, negatives: int,
                max_targets_per_row: int = 0) -> dict[str, Tensor]:
    """Model inputs for PreRec from sequence rows (see the module docstring)."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    dom_names = _domains(rows)
    index = {d: i for i, d in enumerate(domains)}
    unknown = sorted(set(dom_names.tolist()) - set(index))
    if unknown:
        raise DataError(f"sequence rows: domain(s) {unknown} are not among the model's domains {list(domains)}")
    off, items = _lists(rows, "items")
    toff, stamps = _lists(rows, "timestamps")
    if not np.array_equal(off, toff):
        raise DataError("sequence rows: 'items' and 'timestamps' lists differ in length")
    start, n = _windows(off, max_len + 1)
    B, T = len(n), max(int(n.max()) - 1, 1) if len(n) else 1
    cols = np.arange(T + 1)
    valid = cols[None, :] < n[:, None]  # [B, T + 1] items of the window
    pos = np.minimum(start[:, None] + cols[None, :], max(len(items) - 1, 0))
    win = np.where(valid, items[pos] if len(items) else 0, 0)
    days = days_of(stamps[pos], popularity.cfg.day_seconds) if popularity is not None and len(stamps) else None
    mask = valid[:, 1:]  # input w_t is real iff its target w_{t+1} is (inputs w_0..w_{n-2})
    tmask = mask.copy()  # positions trained
    if max_targets_per_row > 0:  # a random subset of each row's targets (bounds N for long rows)
        score = np.where(tmask, rng.random(tmask.shape), np.inf)
        kth = np.sort(score, axis=1)[:, min(max_targets_per_row, T) - 1 : min(max_targets_per_row, T)]
        tmask &= score <= kth

    # Targets (row-major over tmask) and their same-domain negatives.
    rb, rt = np.nonzero(tmask)
    tdom = np.array([index[d] for d in dom_names], dtype=np.int64)[rb] if B else np.zeros(0, np.int64)
    neg = np.empty((len(rb), negatives), dtype=np.int64)
    for k, d in enumerate(domains):
        sel = tdom == k
        if sel.any():
            cat = text.catalogue(d)
            neg[sel] = cat[rng.integers(0, len(cat), (int(sel.sum()), negatives))]

    # Unique (domain, item) pairs of the batch: history, targets, negatives.
    row_dom = np.array([index[d] for d in dom_names], dtype=np.int64)
    hist_ids, tgt_ids = win[:, :-1], win[rb, rt + 1]
    all_dom = np.concatenate([np.repeat(row_dom, T)[mask.ravel()], tdom, np.repeat(tdom, negatives)])
    all_ids = np.concatenate([hist_ids[mask], tgt_ids, neg.ravel()])
    pairs, inverse = np.unique(np.stack([all_dom, all_ids]), axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_h, n_t = int(mask.sum()), len(tgt_ids)
    hist = np.zeros((B, T), dtype=np.int64)
    hist[mask] = inverse[:n_h]
    vecs = np.zeros((pairs.shape[1], text.dim), dtype=np.float32)
    keys = np.zeros(pairs.shape[1], dtype=np.int64)
    for k in np.unique(pairs[0]):
        sel = pairs[0] == k
        d = domains[int(k)]
        try:
            vecs[sel] = text.lookup(d, pairs[1][sel])
        except KeyError as e:
            raise DataError(f"sequence rows: {e.args[0]}") from None
        keys[sel] = offset_keys(d, pairs[1][sel])

    batch = {
        "text": torch.from_numpy(vecs), "key": torch.from_numpy(keys),
        "hist": torch.from_numpy(hist), "mask": torch.from_numpy(mask), "dom": torch.from_numpy(row_dom),
        "tmask": torch.from_numpy(tmask), "tdom": torch.from_numpy(tdom),
        "target": torch.from_numpy(inverse[n_h : n_h + n_t]),
        "neg": torch.from_numpy(inverse[n_h + n_t :].reshape(n_t, negatives)),
    }
    if popularity is not None:
        tday = days[rb, rt + 1] if days is not None else np.zeros(0, np.int64)
        F_pos = np.zeros((n_t, popularity.cfg.orders), np.float32)
        F_neg = np.zeros((n_t, negatives, popularity.cfg.orders), np.float32)
        for k, d in enumerate(domains):
            sel = tdom == k
            if sel.any():
                F_pos[sel] = popularity.factors(d, tgt_ids[sel], tday[sel])
                F_neg[sel] = popularity.factors(d, neg[sel], tday[sel][:, None])
        batch["pop_pos"], batch["pop_neg"] = torch.from_numpy(F_pos), torch.from_numpy(F_neg)
    return batch


def chunk_sequences(seqs: pa.Table, max_len: int) -> pa.Table:
    """Cut sequences longer than max_len + 1 into windows of max_len + 1 items that overlap by one,
    so every target is trained exactly once per epoch (later windows see a shorter history)."""
    off, items = _lists(seqs, "items")
    _, stamps = _lists(seqs, "timestamps")
    lengths = np.diff(off)
    n_chunks = np.maximum(1, -(-(lengths - 1) // max_len))
    row = np.repeat(np.arange(len(lengths)), n_chunks)
    first = np.arange(len(row)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    s = off[row] + first * max_len
    e = np.minimum(s + max_len + 1, off[row + 1])
    cum = np.concatenate([[0], np.cumsum(e - s)])
    take = np.repeat(s - cum[:-1], e - s) + np.arange(int(cum[-1]))
    new_off = pa.array(cum.astype(np.int32))
    out = seqs.take(pa.array(row))
    out = out.set_column(out.schema.get_field_index("items"), "items",
                         pa.ListArray.from_arrays(new_off, pa.array(items[take], pa.int64())))
    return out.set_column(out.schema.get_field_index("timestamps"), "timestamps",
                          pa.ListArray.from_arrays(new_off, pa.array(stamps[take])))


# ---------------------------------------------------------------- evaluation rows


def eval_rows(seqs: pa.Table, max_len: int, last_only: bool = False) -> pa.Table:
    """One eval row per next-item sample of each sequence (or only its last with `last_only`):
    user_id, domain, item_id (the target), history (the <= max_len items before it), timestamp
    (the target's time: popularity is looked up at its day). Rows with no history are skipped."""
    off, items = _lists(seqs, "items")
    _, stamps = _lists(seqs, "timestamps")
    lengths = np.diff(off)
    if last_only:
        row = np.nonzero(lengths >= 2)[0]
        tpos = off[row + 1] - 1
    else:
        per = np.maximum(lengths - 1, 0)
        row = np.repeat(np.arange(len(lengths)), per)
        tpos = off[row] + 1 + (np.arange(len(row)) - np.repeat(np.cumsum(per) - per, per))
    hs = np.maximum(off[row], tpos - max_len)
    hlen = tpos - hs
    hoff = np.concatenate([[0], np.cumsum(hlen)]).astype(np.int64)
    hidx = np.repeat(hs - hoff[:-1], hlen) + np.arange(int(hoff[-1]))
    users = np.asarray(seqs.column("user_id").to_numpy(), dtype=np.int64)
    return pa.table({
        "user_id": pa.array(users[row], pa.int64()),
        "domain": pa.array(_domains(seqs)[row], pa.string()),
        "item_id": pa.array(items[tpos], pa.int64()),
        "history": pa.LargeListArray.from_arrays(pa.array(hoff), pa.array(items[hidx], pa.int64())).cast(
            pa.list_(pa.int64())),
        "timestamp": pa.array(stamps[tpos].astype(np.int64), pa.int64()),
    })


# ---------------------------------------------------------------- rows from the engine


def split_by_domain(rows: pa.Table) -> pa.Table:
    """Per-user cross-domain rows (user_id, items, timestamps, domains: each item's domain, time order)
    -> one row per (user, domain) with that domain's items in the same order (user_id, domain, items,
    timestamps). Rows that already have a `domain` column pass through."""
    if "domain" in rows.schema.names:
        return rows
    if "domains" not in rows.schema.names:
        raise DataError("sequence rows: need a 'domain' column or a per-item 'domains' list column "
                        f"(found: {', '.join(rows.schema.names)})")
    off, items = _lists(rows, "items")
    doff, doms = _lists(rows, "domains")
    _, stamps = _lists(rows, "timestamps")
    if not np.array_equal(off, doff):
        raise DataError("sequence rows: 'items' and 'domains' lists differ in length")
    row = np.repeat(np.arange(len(off) - 1), np.diff(off))
    names, code = np.unique(np.asarray(doms, dtype=object).astype(str), return_inverse=True)
    order = np.lexsort((np.arange(len(row)), code, row))  # by row, then domain; time order kept
    row, code = row[order], code[order]
    new = np.ones(len(row), dtype=bool)
    new[1:] = (row[1:] != row[:-1]) | (code[1:] != code[:-1])
    starts = np.nonzero(new)[0]
    offsets = pa.array(np.append(starts, len(row)).astype(np.int32))
    users = np.asarray(rows.column("user_id").to_numpy(), dtype=np.int64)
    return pa.table({
        "user_id": pa.array(users[row[starts]], pa.int64()),
        "domain": pa.array(names[code[starts]].astype(object), pa.string()),
        "items": pa.ListArray.from_arrays(offsets, pa.array(items[order], pa.int64())),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(stamps)[order].astype(np.int64))),
    })


def in_domain_histories(rows: pa.Table) -> list[np.ndarray] | None:
    """Each eval row's history restricted to the row's own domain (needs `history_domains`, the
    domain of every history item); None when the rows carry no such column (history used as is)."""
    if "history_domains" not in rows.schema.names:
        return None
    off, hist = _lists(rows, "history")
    doff, hdom = _lists(rows, "history_domains")
    if not np.array_equal(off, doff):
        raise DataError("eval rows: 'history' and 'history_domains' lists differ in length")
    dom = _domains(rows)
    row = np.repeat(np.arange(len(off) - 1), np.diff(off))
    keep = np.asarray(hdom, dtype=object) == dom[row]
    return np.split(np.asarray(hist, dtype=np.int64)[keep], np.cumsum(np.bincount(row[keep],
                                                                                  minlength=len(dom)))[:-1])
