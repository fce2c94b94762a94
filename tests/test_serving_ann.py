"""The reader's IVF index for large catalogues (xdtrain/serving/ann.py): recall against the exact
top-k, the exact path below `index_min_rows`, a forced exact answer, and the pinned version."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from xdtrain.refresh.infer import write_version
from xdtrain.serving import EmbeddingReader

D = 32
BIG, SMALL, USERS, K = 20_000, 2_000, 300, 10


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Rows near random centres (the shape of learned item vectors: topics), float32."""
    return (centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, D))).astype(np.float32)


def vector_table(ids: np.ndarray, vecs: np.ndarray, domains: list[str] | None = None) -> pa.Table:
    cols = {"id": pa.array(ids, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), D)}
    if domains is not None:
        cols["domain"] = pa.array(domains, pa.string())
    return pa.table(cols)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((64, D))
    items = clustered(rng, BIG + SMALL, centres)
    item_ids = rng.permutation(10 * (BIG + SMALL))[: BIG + SMALL].astype(np.int64) + 1
    users = clustered(rng, USERS, centres)
    out = str(tmp_path_factory.mktemp("ann") / "store")
    doms = ["big"] * BIG + ["small"] * SMALL
    write_version(out, "v1", {"item": vector_table(item_ids, items, doms),
                              "user": vector_table(np.arange(USERS, dtype=np.int64), users)})
    return {"out": out, "items": items, "item_ids": item_ids, "users": users}


def exact_top(users: np.ndarray, items: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(users @ items.T), axis=1, kind="stable")[:, :k]]


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def test_ivf_recall_and_exact_below_the_threshold(world):
    reader = EmbeddingReader(world["out"], index_min_rows=10_000, nprobe=32)
    uid = np.arange(USERS)
    assert reader.index_kind("item", "big") == "ivf" and reader.index_kind("item", "small") == "exact"
    big = world["items"][:BIG], world["item_ids"][:BIG]
    want = exact_top(world["users"], *big, K)

    ids, scores = reader.top_k(uid, K, "big")
    assert ids.shape == (USERS, K) and (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    assert recall(ids, want) >= 0.95
    reader.nprobe = 2  # the same index, 2 of its ~500 lists probed: approximate, visibly
    assert recall(reader.top_k(uid, K, "big")[0], want) < 0.9
    reader.nprobe = 32
    # every score is the item's exact inner product with the user
    lookup = dict(zip(big[1].tolist(), big[0]))
    np.testing.assert_allclose(scores[:5], [[world["users"][u] @ lookup[i] for i in row]
                                            for u, row in enumerate(ids[:5].tolist())], rtol=1e-4, atol=1e-4)
    # forced exact: probing every list is the exact top-k
    ids_x, _ = reader.top_k(uid, K, "big", exact=True)
    assert recall(ids_x, want) >= 0.999
    # a reader whose threshold is above the catalogue answers exactly, and so does the small domain
    plain = EmbeddingReader(world["out"], index_min_rows=BIG + 1)
    assert plain.index_kind("item", "big") == "exact"
    assert recall(plain.top_k(uid, K, "big")[0], want) >= 0.999
    small_want = exact_top(world["users"], world["items"][BIG:], world["item_ids"][BIG:], K)
    assert recall(reader.top_k(uid, K, "small")[0], small_want) >= 0.999
    # a catalogue over index_bytes is streamed from its files, exact
    assert EmbeddingReader(world["out"], index_bytes=0, index_min_rows=10).index_kind("item", "big") == "streamed"


def test_ivf_serves_the_pinned_version(world, tmp_path):
    """An index built after a newer version is published still holds (and answers from) the version
    the reader opened: v2's items have ids v1 never had."""
    reader = EmbeddingReader(world["out"], index_min_rows=SMALL)  # the small domain: a quick build
    rng = np.random.default_rng(8)
    v2_ids = world["item_ids"] + 10**9
    v2 = vector_table(v2_ids, rng.standard_normal((BIG + SMALL, D)).astype(np.float32),
                      ["big"] * BIG + ["small"] * SMALL)
    write_version(world["out"], "v2", {"item": v2, "user": vector_table(np.arange(USERS, dtype=np.int64),
                                                                        world["users"] * -1)})
    try:
        assert EmbeddingReader(world["out"]).version == "v2" and reader.version == "v1"
        ids, _ = reader.top_k(np.arange(50), K, "small")  # the index is built now, after v2's publish
        assert reader.index_kind("item", "small") == "ivf" and reader.ivf_index("item", "small").rows == SMALL
        assert np.isin(ids, world["item_ids"][BIG:]).all()
        want = exact_top(world["users"][:50], world["items"][BIG:], world["item_ids"][BIG:], K)
        assert recall(ids, want) >= 0.95
    finally:
        from xdtrain.serving import store

        store.rollback(world["out"], "v1")
