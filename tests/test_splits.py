"""Splits: leave-one-out by time, chronological cuts, seeded user-level split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from xdtrain.data.movielens import MovieLensConfig, prepare
from xdtrain.data.schemas import DataError
from xdtrain.data.splits import assign_users, chronological_split, leave_one_out, user_split


def table(rows) -> pa.Table:
    u, i, t = zip(*rows)
    return pa.table(
        {"user_id": list(u), "item_id": list(i), "domain": ["d"] * len(rows), "timestamp": list(t)}
    )


def triples(t: pa.Table) -> list[tuple]:
    return sorted(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["timestamp"].to_pylist()))


@pytest.fixture(scope="module")
def ml100k() -> pa.Table:
    return prepare(MovieLensConfig(dataset="ml-100k-kg", k_core=5)).interactions


def test_loo_hand_example():
    rows = [
        (1, 10, 5),
        (1, 11, 1),
        (1, 12, 9),
        (1, 13, 7),  # by time: 11, 10, 13, 12
        (2, 21, 3),
        (2, 20, 3),
        (2, 22, 3),  # all tied: item id order 20, 21, 22
        (3, 30, 1),
        (3, 31, 2),  # too short for LOO
    ]
    parts = leave_one_out(table(rows))
    assert triples(parts["test"]) == [(1, 12, 9), (2, 22, 3)]
    assert triples(parts["valid"]) == [(1, 13, 7), (2, 21, 3)]
    assert triples(parts["train"]) == [(1, 10, 5), (1, 11, 1), (2, 20, 3), (3, 30, 1), (3, 31, 2)]
    dropped = leave_one_out(table(rows), short="drop")
    assert 3 not in dropped["train"]["user_id"].to_pylist()
    with pytest.raises(DataError, match="min_interactions >= 3"):
        leave_one_out(table(rows), min_interactions=2)


def test_loo_on_movielens(ml100k):
    parts = leave_one_out(ml100k)
    n_users = len(pc.unique(ml100k["user_id"]))
    assert parts["test"].num_rows == parts["valid"].num_rows == n_users  # 5-core: every user has >= 5
    assert sum(p.num_rows for p in parts.values()) == ml100k.num_rows
    # Exactly the last two per user by time: an independent check with Python sorting.
    by_user: dict[int, list] = {}
    for u, i, t in zip(*(ml100k[c].to_pylist() for c in ("user_id", "item_id", "timestamp"))):
        by_user.setdefault(u, []).append((t, i))
    last = {u: sorted(v)[-1] for u, v in by_user.items()}
    second = {u: sorted(v)[-2] for u, v in by_user.items()}
    assert {(u, (t, i)) for u, i, t in triples(parts["test"])} == set(last.items())
    assert {(u, (t, i)) for u, i, t in triples(parts["valid"])} == set(second.items())
    # No leakage: per user, valid and test are not earlier than any train interaction.
    max_train = {}
    for u, _, t in triples(parts["train"]):
        max_train[u] = max(max_train.get(u, t), t)
    for name in ("valid", "test"):
        assert all(t >= max_train[u] for u, _, t in triples(parts[name]))


def test_loo_per_domain():
    t = pa.table(
        {
            "user_id": [1] * 6,
            "item_id": [1, 2, 3, 4, 5, 6],
            "domain": ["a", "a", "a", "b", "b", "b"],
            "timestamp": [1, 2, 3, 4, 5, 6],
        }
    )
    parts = leave_one_out(t, by_domain=True)
    assert sorted(parts["test"]["item_id"].to_pylist()) == [3, 6]
    assert sorted(parts["valid"]["item_id"].to_pylist()) == [2, 5]


def test_chronological_global(ml100k):
    parts = chronological_split(ml100k, (0.8, 0.1, 0.1), mode="global")
    n = ml100k.num_rows
    assert sum(p.num_rows for p in parts.values()) == n
    for name, r in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert abs(parts[name].num_rows / n - r) < 0.01
    assert pc.max(parts["train"]["timestamp"]).as_py() < pc.min(parts["valid"]["timestamp"]).as_py()
    assert pc.max(parts["valid"]["timestamp"]).as_py() < pc.min(parts["test"]["timestamp"]).as_py()
    # Rows sharing the timestamp at a cut go to the earlier part. Rows 2..6 have t=3.
    tied = table([(k, k, t) for k, t in enumerate([1, 2, 3, 3, 3, 3, 3, 4, 5, 6])])
    sizes = lambda p: [p[x].num_rows for x in ("train", "valid", "test")]  # noqa: E731
    assert sizes(chronological_split(tied, (0.2, 0.5, 0.3))) == [2, 5, 3]  # cuts 2, 7: after t=2 and t=3
    assert sizes(chronological_split(tied, (0.5, 0.2, 0.3))) == [7, 0, 3]  # cuts 5, 7 both inside t=3 -> 7


def test_chronological_per_user():
    rows = [(1, k, 10 - k) for k in range(10)] + [(2, k, k) for k in range(4)]
    p = chronological_split(table(rows), (0.6, 0.2, 0.2), mode="user")
    # user 1: 10 rows -> the 2 latest (t=10, 9) test, next 2 valid, 6 train.
    # user 2: 4 rows -> floor(4 * 0.2) = 0 valid and 0 test.
    assert triples(p["test"]) == [(1, 0, 10), (1, 1, 9)]
    assert triples(p["valid"]) == [(1, 2, 8), (1, 3, 7)]
    assert p["train"].num_rows == 6 + 4


def test_user_split_deterministic_disjoint_and_ratios():
    users = np.arange(1, 200_001, dtype=np.int64)
    a = assign_users(users, (0.4, 0.3, 0.3), seed=7)
    assert np.array_equal(a, assign_users(users, (0.4, 0.3, 0.3), seed=7))
    assert np.array_equal(
        a[::-1], assign_users(users[::-1], (0.4, 0.3, 0.3), seed=7)
    )  # per user, not per position
    assert (a != assign_users(users, (0.4, 0.3, 0.3), seed=8)).mean() > 0.5
    frac = np.bincount(a, minlength=3) / len(a)
    assert np.all(np.abs(frac - [0.4, 0.3, 0.3]) < 0.01), frac
    s = assign_users(
        pa.array([f"user-{k}" for k in range(20_000)]), (0.8, 0.1, 0.1), seed=0
    )  # string ids hash
    assert np.all(np.abs(np.bincount(s, minlength=3) / len(s) - [0.8, 0.1, 0.1]) < 0.02)
    with pytest.raises(DataError, match="summing to 1"):
        assign_users(users, (0.5, 0.5, 0.5), seed=0)


def test_user_split_tables(ml100k):
    parts = user_split(ml100k, (0.4, 0.3, 0.3), seed=3)
    sets = {k: set(v["user_id"].to_pylist()) for k, v in parts.items()}
    assert (
        not (sets["train"] & sets["valid"])
        and not (sets["train"] & sets["test"])
        and not (sets["valid"] & sets["test"])
    )
    assert sum(p.num_rows for p in parts.values()) == ml100k.num_rows
    again = user_split(ml100k, (0.4, 0.3, 0.3), seed=3)
    assert all(parts[k].equals(again[k]) for k in parts)
