"""Sequences: hand-computed order and tie-breaks; the Ray path equals the in-memory path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.data.schemas import DataError
from xdtrain.data.sequences import (
    build_sequences,
    build_sequences_ray,
    read_sequences,
)

# user 1: domain a has a timestamp tie (t=5, items 30 and 20 -> 20 first by item id);
# domain b has an exact (t, item) tie broken by rating. user 2: one row.
ROWS = [
    # user, item, domain, ts, rating
    (1, 30, "a", 5, 4.0),
    (2, 11, "a", 1, 1.0),
    (1, 10, "a", 9, 3.0),
    (1, 20, "a", 5, 5.0),
    (1, 40, "b", 2, 5.0),
    (1, 40, "b", 2, 2.0),
    (1, 50, "b", 1, 1.0),
]


def table(rows=ROWS) -> pa.Table:
    u, i, d, t, r = zip(*rows)
    return pa.table(
        {
            "user_id": pa.array(u, pa.int64()),
            "item_id": pa.array(i, pa.int64()),
            "domain": pa.array(d, pa.string()),
            "timestamp": pa.array(t, pa.int64()),
            "rating": pa.array(r, pa.float32()),
        }
    )


def test_hand_computed_sequences():
    seq = build_sequences(table())
    assert seq.schema.names == ["user_id", "domain", "items", "timestamps", "ratings"]
    assert seq.schema.field("items").type == pa.list_(pa.int64())
    assert seq.to_pylist() == [
        {
            "user_id": 1,
            "domain": "a",
            "items": [20, 30, 10],
            "timestamps": [5, 5, 9],
            "ratings": [5.0, 4.0, 3.0],
        },
        {
            "user_id": 1,
            "domain": "b",
            "items": [50, 40, 40],
            "timestamps": [1, 2, 2],
            "ratings": [1.0, 2.0, 5.0],
        },
        {"user_id": 2, "domain": "a", "items": [11], "timestamps": [1], "ratings": [1.0]},
    ]


def test_input_order_does_not_matter():
    rng = np.random.default_rng(0)
    expected = build_sequences(table())
    for _ in range(5):
        shuffled = table([ROWS[i] for i in rng.permutation(len(ROWS))])
        assert build_sequences(shuffled).equals(expected)


def test_all_domains_with_per_position_domain():
    seq = build_sequences(table(), extra_columns=["domain"], by_domain=False)
    assert seq.schema.names == ["user_id", "items", "timestamps", "domains"]
    assert seq.to_pylist()[0] == {
        "user_id": 1,
        "items": [50, 40, 40, 20, 30, 10],
        "timestamps": [1, 2, 2, 5, 5, 9],
        "domains": ["b", "b", "b", "a", "a", "a"],
    }


def test_bad_inputs():
    with pytest.raises(DataError, match="extra column\\(s\\) \\['clicks'\\] not found"):
        build_sequences(table(), extra_columns=["clicks"])
    with pytest.raises(DataError, match="missing required column 'timestamp'"):
        build_sequences(table().drop_columns(["timestamp"]))
    nulls = table().set_column(3, "timestamp", pa.array([1, None, 3, 4, 5, 6, 7], pa.int64()))
    with pytest.raises(DataError, match="column 'timestamp' has 1 null value\\(s\\) \\(first at row 1\\)"):
        build_sequences(nulls)


def synthetic(n_users=150, n_rows=4000, seed=1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "user_id": rng.integers(0, n_users, n_rows),
            "item_id": rng.integers(0, 60, n_rows),
            "domain": pa.array(rng.choice(["books", "movies", "music"], n_rows)),
            "timestamp": rng.integers(0, 40, n_rows),  # many ties on purpose
            "rating": rng.integers(1, 6, n_rows).astype(np.float32),
            "label": np.ones(n_rows, dtype=np.int8),
        }
    )


@pytest.mark.ray
def test_ray_path_equals_memory_path(ray_cluster, tmp_path):
    inter = synthetic()
    src = tmp_path / "inter"
    src.mkdir()
    for k, part in enumerate(np.array_split(np.random.default_rng(2).permutation(inter.num_rows), 3)):
        pq.write_table(inter.take(pa.array(part)), src / f"part-{k}.parquet")  # rows scattered over 3 files
    dst = tmp_path / "seqs"
    build_sequences_ray(str(src), str(dst), num_partitions=3)
    got = read_sequences(dst)
    expected = build_sequences(inter)
    assert (
        got.num_rows
        == expected.num_rows
        == len({(u, d) for u, d in zip(inter["user_id"].to_pylist(), inter["domain"].to_pylist())})
    )
    assert got.select(expected.column_names).equals(expected)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

