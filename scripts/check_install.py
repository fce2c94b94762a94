"""Smoke-check the pinned stack right after install: DGL, Ray and the offline MiniLM model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dgl  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from xdtrain.text.encoder import default_model_path, load_text_encoder  # noqa: E402

model = load_text_encoder(default_model_path())
vec = model.encode(["a quiet film about a lighthouse"], convert_to_numpy=True)
assert vec.shape == (1, 384), vec.shape
print(f"ok: torch {torch.__version__}, dgl {dgl.__version__}, ray {ray.__version__}, MiniLM {vec.shape[1]}-d")
