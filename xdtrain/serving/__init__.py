"""Serving from published embedding versions: the store layout and its pointer (`store`), and the
pinned reader (`EmbeddingReader`: `vectors(ids)`, `top_k(user_ids, k, domain)`). The refresh job
(`xdtrain/refresh/`) writes what this package reads."""

from xdtrain.serving.reader import EmbeddingReader
from xdtrain.serving.store import finished_versions, read_current, rollback

__all__ = ["EmbeddingReader", "finished_versions", "read_current", "rollback"]
