"""Item-text encoding cached to Parquet by (domain, item, text hash); the Ray Data path matches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from xdtrain.data.schemas import DataError
from xdtrain.text.cache import (
    ItemVectors,
    TextCache,
    TextEncodeConfig,
    compact_cache,
    encode_items,
    encode_items_ray,
    text_hashes,
)
from xdtrain.text.encoder import load_text_encoder

TEXTS = ["a football match in the stadium", "soccer players score a goal", "a recipe for tomato soup",
         "tomato soup with basil", "a thriller about a bank robbery"]


def _items(texts=TEXTS) -> pa.Table:
    # item 1 exists in both domains with the same text: two keys, one encoding
    return pa.table({"item_id": [1, 2, 3, 4, 1], "domain": ["x", "x", "x", "x", "y"], "text": texts})


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_encode_then_reuse_and_reencode_only_changed_text(tmp_path, minilm):
    cfg = TextEncodeConfig(cache_dir=str(tmp_path / "cache"), batch_size=2)
    first = encode_items(_items(), cfg)
    assert (first.n_encoded, first.n_cached) == (5, 0)
    v = first.vectors
    assert v.domains == ["x", "y"] and v.dim == 384
    want = minilm.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(v.lookup("x", [1, 2, 3, 4]), want[:4], atol=1e-5)
    np.testing.assert_allclose(v.lookup("y", [1]), want[4:], atol=1e-5)

    again = encode_items(_items(), cfg)
    assert (again.n_encoded, again.n_cached) == (0, 5)
    np.testing.assert_array_equal(again.vectors.lookup("x", [1, 2, 3, 4]), v.lookup("x", [1, 2, 3, 4]))

    changed = list(TEXTS)
    changed[2] = "a recipe for pumpkin pie"
    third = encode_items(_items(changed), cfg)
    assert (third.n_encoded, third.n_cached) == (1, 4)
    np.testing.assert_allclose(third.vectors.lookup("x", [3])[0], minilm.encode(changed[2], normalize_embeddings=True),
                               atol=1e-5)
    np.testing.assert_array_equal(third.vectors.lookup("x", [4]), v.lookup("x", [4]))
    assert len(TextCache(cfg.cache_dir).parts()) == 2  # one part per run that encoded something

    # compaction keeps only the live rows, in one part, and nothing is re-encoded after it
    assert compact_cache(cfg.cache_dir, _items(changed)) == 5
    assert len(TextCache(cfg.cache_dir).parts()) == 1
    assert encode_items(_items(changed), cfg).n_encoded == 0
    # another model setting never reads these vectors
    raw = encode_items(_items(), TextEncodeConfig(cache_dir=cfg.cache_dir, normalize=False))
    assert raw.n_encoded == 5


def test_bad_items_are_named(tmp_path):
    cfg = TextEncodeConfig(cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"my_items: row 1 \(domain x, item 2\) has no text"):
        encode_items(pa.table({"item_id": [1, 2], "domain": ["x", "x"], "text": ["a", None]}), cfg, "my_items")
    with pytest.raises(DataError, match="missing column 'text'"):
        encode_items(pa.table({"item_id": [1], "domain": ["x"]}), cfg)
    with pytest.raises(DataError, match="several texts"):
        encode_items(pa.table({"item_id": [1, 1], "domain": ["x", "x"], "text": ["a", "b"]}), cfg)


def test_item_vectors_lookup():
    v = ItemVectors({"x": (np.array([5, 2, 9]), np.arange(6, dtype=np.float32).reshape(3, 2))})
    assert v.catalogue("x").tolist() == [2, 5, 9]
    np.testing.assert_array_equal(v.lookup("x", np.array([[9, 5]])), [[[4, 5], [0, 1]]])
    with pytest.raises(KeyError, match="item 7 of domain 'x'"):
        v.lookup("x", [7])
    with pytest.raises(KeyError, match="no item vectors for domain 'z'"):
        v.lookup("z", [1])
    assert text_hashes(["a", "b", "a"])[0] == text_hashes(["a"])[0] != text_hashes(["b"])[0]


def test_ray_data_path_matches_and_shares_the_cache(tmp_path, ray_cluster, minilm):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "fast", "slow", "cheap", "book", "film", "song", "game"]
    texts = [" ".join(rng.choice(words, 4)) for _ in range(60)]
    items = pa.table({"item_id": np.arange(60), "domain": ["x"] * 30 + ["y"] * 30, "text": texts})
    cfg = TextEncodeConfig(cache_dir=str(tmp_path / "cache"), num_actors=2, batch_size=16)
    got = encode_items_ray(items, cfg, rows_per_task=16)
    assert (got.n_encoded, got.n_cached) == (60, 0)
    want = minilm.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(got.vectors.lookup("x", np.arange(30)), want[:30], atol=1e-5)
    np.testing.assert_allclose(got.vectors.lookup("y", np.arange(30, 60)), want[30:], atol=1e-5)
    assert len(TextCache(cfg.cache_dir).parts()) >= 2  # parts written by the actors in parallel
    local = encode_items(items, cfg)  # the in-process path reads what the actors wrote
    assert (local.n_encoded, local.n_cached) == (0, 60)
