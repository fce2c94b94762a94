"""The embedding refresh on PreRec (issue 13): a tiny PreRec checkpoint (in-process PS, a few
hand-written steps, as tests/test_refresh.py makes its SeqRec ones; seeded text vectors) refreshed
in-process; the published user and item vectors rank the held-out rows as PreRec's own scorer does.
The popularity term is off: U_i . V_j is then the scorer's logit up to the per-domain constant D_k W_d
(tests/test_prerec.py::test_exported_vectors_rank_as_the_scorer_without_popularity)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from enginekit import make_world
from test_refresh import make_checkpoint

from xdtrain.config import load_config
from xdtrain.data.validate import read_dataset
from xdtrain.eval.evaluator import user_batch
from xdtrain.models import build_model
from xdtrain.ps import LocalPS
from xdtrain.refresh.job import run_refresh
from xdtrain.serving import EmbeddingReader, store
from xdtrain.text.cache import TextCache, item_keys
from xdtrain.train import checkpointing as ck
from xdtrain.train.config import RefreshConfig
from xdtrain.train.datasets import prepare_data

TINY = ["model.d=16", "model.max_len=20", "model.negatives=16", "model.use_popularity=false",
        "model.balanced=false", "data.streams=[train]", "workers=0", "rows_per_bucket=300"]


def seed_text_cache(items_url: str, cache_dir: str, dim: int = 384) -> None:
    """Seeded unit vectors in the text cache in place of MiniLM's (encoding the 800 titles took 22 s
    here): PreRec reads them as f_BERT(X_j); the refresh never touches the encoder."""
    keys = item_keys(read_dataset(items_url, "items", ["item_id", "domain", "text"])[1])
    vecs = np.random.default_rng(0).standard_normal((keys.num_rows, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    TextCache(cache_dir).write_part(keys.append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim)))


@pytest.fixture(scope="module")
def prerec(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh_prerec")
    world = make_world(root / "world")
    cfg = load_config(RefreshConfig, "configs/prerec_demo.yaml",
                      [f"run_dir={root / 'run'}", f"data.world_url={world}", f"model.text_cache={root / 'text'}",
                       f"out={root / 'store'}", f"refresh_dir={root / 'work'}", *TINY])
    data = prepare_data(cfg.data, root / "prep", min_groups=1)
    seed_text_cache(data.model_data.tables["items"], cfg.model["text_cache"])
    checkpoint = make_checkpoint(cfg, data, root / "ck" / ck.checkpoint_name(3))
    cfg.checkpoint = str(checkpoint)
    return cfg, run_refresh(cfg), data


def test_prerec_published_vectors_rank_as_its_scorer(prerec):
    cfg, summary, data = prerec
    out = str(cfg.out)
    info = store.read_version(out, summary["version"])
    canary = next(e for e in info["checks"] if e["check"] == "canary")
    assert canary["ok"] and canary["values"]["rows"] > 50
    assert canary["values"]["published"] == pytest.approx(canary["values"]["model"], abs=1e-6)
    # the scores themselves: reader dot products = PreRec's logits up to one constant per domain
    model = build_model(cfg.model, data.model_data, 0)
    ck.load_dense(cfg.checkpoint, model)
    model.eval()
    catalogue = {d: np.asarray(model.text.catalogue(d)) for d in model.text.domains}
    assert info["tables"]["item"]["rows"] == sum(len(v) for v in catalogue.values())  # every domain's items
    ps = LocalPS.from_checkpoint(ck.ps_url(cfg.checkpoint))
    rows = data.test.rows
    reader = EmbeddingReader(out)
    doms = np.asarray(rows["domain"].to_pylist(), dtype=object)
    for d in sorted(set(doms.tolist())):
        idx = np.flatnonzero(doms == d)[:8]
        items = catalogue[d]
        mine = (reader.vectors(rows["user_id"].to_numpy()[idx], "user", d)
                @ reader.vectors(items, "item", d).T)
        with torch.no_grad():
            theirs = model.scorer(rows, ps.pull)(user_batch(rows, idx), torch.as_tensor(items), domain=d).numpy()
        gap = theirs - mine
        np.testing.assert_allclose(gap, np.full_like(gap, gap[0, 0]), atol=1e-4)
        top, _ = reader.top_k(rows["user_id"].to_numpy()[idx], k=5, domain=d)
        np.testing.assert_array_equal(top, items[np.argsort(-theirs, axis=1, kind="stable")[:, :5]])
