"""The in-process program loop's batches (xdtrain/train/local_program.py): shuffled, or grouped by a key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from xdtrain.train.local_program import _Cursor


def batches(cur: _Cursor) -> list[np.ndarray]:
    out = []
    while (b := cur.next()) is not None:
        out.append(b["row"].to_numpy())
    return out


def test_without_groups_the_order_is_the_generators_permutation():
    table = pa.table({"row": np.arange(50)})
    got = np.concatenate(batches(_Cursor(table, 8, np.random.default_rng(3))))
    np.testing.assert_array_equal(got, np.random.default_rng(3).permutation(50))


def test_grouped_batches_keep_a_groups_rows_together_and_read_every_row_once():
    groups = np.repeat(np.arange(5), 20)[np.random.default_rng(0).permutation(100)]  # 5 groups, rows mixed
    table = pa.table({"row": np.arange(100)})
    cur = _Cursor(table, 8, np.random.default_rng(1), groups)
    got = batches(cur)
    flat = np.concatenate(got)
    assert sorted(flat.tolist()) == list(range(100))
    assert all(len(set(groups[b].tolist())) <= 2 for b in got)  # a batch straddles at most two groups
    runs = groups[flat]
    assert (np.diff(runs) != 0).sum() == 4  # each group is read as one run
    cur.reshuffle()
    again = np.concatenate(batches(cur))
    assert not np.array_equal(again, flat) and (np.diff(groups[again]) != 0).sum() == 4
