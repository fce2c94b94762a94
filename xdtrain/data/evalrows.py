"""Eval rows from a split: each target interaction with the user's history before it, and seen flags.

An eval row (the `EvalSet` rows of `xdtrain.eval.candidates`) is one target interaction:

    user_id, item_id, domain     the target, as the interactions carry them
    history          list<int64>  the user's interactions before the target (every domain, time order)
    timestamp        int64        the target's time
    history_domains  list<string> the domain of each history item

"Before" is the sequence order of `xdtrain.data.splits.time_order`, so under a global leave-one-out
the valid row's history is the user's train items and the test row's adds the valid item.
`with_seen_flags` adds the `new_user` / `new_item` / `unseen` flags for `eval.groups`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def target_rows(rows: pa.Table, start: np.ndarray, targets: np.ndarray, max_history: int = 0) -> pa.Table:
    """Eval rows of the `targets` (row indices, ascending) of `rows`, which are sorted by user then
    time with `start` the first row of each row's user (`time_order`). `max_history` > 0 keeps the
    last `max_history` items of each history. Rows keep the order of `targets`."""
    targets = np.asarray(targets, dtype=np.int64)
    first = start[targets] if max_history <= 0 else np.maximum(start[targets], targets - max_history)
    lengths = targets - first
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hist_idx = pa.array(np.repeat(first - offsets[:-1], lengths) + np.arange(int(offsets[-1])))
    take = pa.array(targets)
    items = pc.cast(rows["item_id"].take(hist_idx), pa.int64()).combine_chunks()
    domains = pc.cast(rows["domain"].take(hist_idx), pa.string()).combine_chunks()
    off = pa.array(offsets.astype(np.int32))
    return pa.table({
        "user_id": rows["user_id"].take(take),
        "item_id": rows["item_id"].take(take),
        "domain": rows["domain"].take(take),
        "history": pa.ListArray.from_arrays(off, items),
        "timestamp": pc.cast(rows["timestamp"].take(take), pa.int64()),
        "history_domains": pa.ListArray.from_arrays(off, domains),
    })


def unseen_flags(rows: pa.Table, source_users: np.ndarray, source_items: np.ndarray) -> np.ndarray:
    """The paper's "unseen" test samples (PreRec code `get_many`): the user is no source-domain user AND
    the target item is in no source catalogue (raw ids matched across domains; history not checked)."""
    users = np.asarray(rows.column("user_id").to_numpy(), dtype=np.int64)
    items = np.asarray(rows.column("item_id").to_numpy(), dtype=np.int64)
    return ~np.isin(users, np.asarray(source_users, np.int64)) & ~np.isin(items, np.asarray(source_items, np.int64))


def with_seen_flags(rows: pa.Table, source_users: np.ndarray, source_items: np.ndarray) -> pa.Table:
    """Eval rows plus boolean columns `new_user` (the user has no source-domain interaction),
    `new_item` (the target is in no source-domain catalogue; raw ids) and `unseen` (both: the
    paper's unseen test set), so that `eval.groups=[unseen]` reports the paper's all / unseen."""
    none = np.zeros(0, np.int64)  # unseen_flags against an empty side tests the other side only
    flags = {"new_user": unseen_flags(rows, source_users, none),
             "new_item": unseen_flags(rows, none, source_items),
             "unseen": unseen_flags(rows, source_users, source_items)}
    for col, values in flags.items():
        rows = rows.append_column(col, pa.array(values, pa.bool_()))
    return rows
