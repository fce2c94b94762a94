"""Engine evaluation for PreRec-style tables (issue 7): Recall@K% / r-NDCG@K% and groups passed through
`eval:`, the new_user / new_item / unseen flags of prepare_data, and the SBERT baseline. All fast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xdtrain.data.schemas import DataError
from xdtrain.eval.baselines import SBERTScorer, baseline_scorer
from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.evaluator import EvalConfig, evaluate
from xdtrain.models import ModelData
from xdtrain.text.cache import KEYS, ItemVectors, TextCache, item_keys
from xdtrain.train import evaluation as E  # (a module: pytest would collect `test_report` itself)
from xdtrain.train.config import DataConfig, EvalSection
from xdtrain.train.datasets import prepare_data

# ---------------------------------------------------------------- Recall@K%, r-NDCG@K%, groups


def _two_rows() -> EvalSet:
    """Catalogue 0..19; under `by_id` (lower id = higher score) row 0's target 3 ranks 4, row 1's 5 ranks 6."""
    rows = pa.table({"user_id": [1, 2], "item_id": [3, 5], "domain": ["d", "d"],
                     "history": pa.array([[], []], pa.list_(pa.int64())), "unseen": [True, False]})
    return EvalSet(rows, {"d": np.arange(20)}, name="two rows")


def by_id(users, items, *, domain):
    scores = -items.double()
    return scores.expand(len(users["row"]), -1) if items.dim() == 1 else scores


class _Model(torch.nn.Module):
    def scorer(self, rows, pull):
        return by_id


SECTION = dict(ks=[5], k_percents=[25.0], rndcg_a=2.0, rndcg_b=100.0, groups=["unseen"], monitor="rndcg@25%")
RNDCG_ROW0 = math.log(2) / math.log(2 + 100 * 3 / 20)  # rank 4 of N = 20, K_abs = 5


def test_ranking_eval_passes_k_percents_rndcg_and_groups():
    ev = E.RankingEval(_two_rows(), EvalSection(**SECTION))
    flat = ev.flat(by_id)
    assert ev.monitor == "full/rndcg@25%" and ev.monitor in flat
    assert flat["full/recall@25%"] == pytest.approx(0.5)  # row 1 (rank 6) is past K_abs = 5
    assert flat["full/rndcg@25%"] == pytest.approx(RNDCG_ROW0 / 2)
    groups = ev.results(by_id)["full"].summary()["overall"]
    assert groups["unseen=true"]["rndcg@25%"] == pytest.approx(RNDCG_ROW0)
    assert groups["unseen=false"]["recall@25%"] == 0.0 and groups["unseen=false"]["count"] == 1


def test_test_report_breaks_the_summary_down_by_group(tmp_path):
    cfg = EvalSection(**SECTION, baselines=["random"])
    tests = E.test_report(_Model(), None, _two_rows(), cfg, tmp_path, name="m")
    out = E.summarize_tests(tests)
    assert out["test"]["m"]["full"]["recall@25%"] == pytest.approx(0.5)
    assert out["test_groups"]["m"]["full"]["unseen=true"]["recall@25%"] == 1.0
    assert set(out["test_groups"]) == {"m", "random"}
    assert (tmp_path / "m_full" / "metrics.json").exists()
    plain = E.test_report(_Model(), None, _two_rows(), EvalSection(baselines=[]), tmp_path / "plain", name="m")
    assert "test_groups" not in E.summarize_tests(plain)


# ---------------------------------------------------------------- new_user / new_item / unseen


def _interactions(tmp_path: Path) -> str:
    """Sources a, b; held-out c. Item 11 is in a and c (raw ids match across domains)."""
    log = [  # (user, item, domain, time)
        (1, 10, "a", 1), (1, 11, "a", 2), (1, 12, "a", 3),
        (2, 10, "c", 1), (2, 20, "c", 2), (2, 21, "c", 3),
        (3, 20, "c", 1), (3, 30, "c", 2), (3, 11, "c", 3),
        (4, 12, "a", 1), (4, 20, "c", 2), (4, 21, "c", 3), (4, 30, "c", 4),
        (5, 40, "b", 1), (5, 41, "b", 2), (5, 42, "b", 3),
    ]
    u, i, d, t = zip(*log)
    url = tmp_path / "interactions"
    url.mkdir()
    pq.write_table(pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                             "domain": list(d), "timestamp": pa.array(t, pa.int64())}), url / "part-0.parquet")
    return str(url)


def _flags(data: EvalSet) -> dict[int, tuple[bool, bool, bool]]:
    r = data.rows.to_pydict()
    return {u: tuple(f) for u, *f in zip(r["user_id"], r["new_user"], r["new_item"], r["unseen"])}


def test_unseen_flags_against_explicit_source_domains(tmp_path):
    cfg = DataConfig(source="parquet", interactions_url=_interactions(tmp_path), source_domains=["a", "b"])
    data = prepare_data(cfg, tmp_path / "run")
    # test targets: 1->12 (seen user, seen item), 2->21 (both new), 3->11 (item 11 is in a), 4->30 (user 4 is in a)
    assert _flags(data.test) == {1: (False, False, False), 2: (True, True, True), 3: (True, False, False),
                                 4: (False, True, False), 5: (False, False, False)}
    # valid targets: 1->11, 2->20, 3->30, 4->21
    assert _flags(data.valid) == {1: (False, False, False), 2: (True, True, True), 3: (True, True, True),
                                  4: (False, True, False), 5: (False, False, False)}
    # the same flags survive eval_domains (the held-out domain only)
    held = prepare_data(DataConfig(**{**cfg.__dict__, "eval_domains": ["c"]}), tmp_path / "run_c")
    assert _flags(held.test) == {u: f for u, f in _flags(data.test).items() if u in (2, 3, 4)}


def test_unseen_flags_default_to_the_train_domains(tmp_path):
    url = _interactions(tmp_path)
    # Sources = the train domains (a, c): every eval row's user trains, so nothing is new.
    data = prepare_data(DataConfig(source="parquet", interactions_url=url, train_domains=["a", "c"]), tmp_path / "r1")
    assert set(_flags(data.test).values()) == {(False, False, False)}
    # No train_domains: every domain is a source.
    data = prepare_data(DataConfig(source="parquet", interactions_url=url), tmp_path / "r2")
    assert set(_flags(data.test).values()) == {(False, False, False)} and data.test.num_rows == 5
    # Only a as source, c trained too: user 2's and 3's rows are new users.
    data = prepare_data(DataConfig(source="parquet", interactions_url=url, train_domains=["a", "c"],
                                   source_domains=["a"]), tmp_path / "r3")
    assert _flags(data.test) == {1: (False, False, False), 2: (True, True, True), 3: (True, False, False),
                                 4: (False, True, False)}
    with pytest.raises(DataError, match=r"data\.source_domains: unknown domain\(s\) \['x'\]"):
        prepare_data(DataConfig(source="parquet", interactions_url=url, source_domains=["x"]), tmp_path / "r4")


# ---------------------------------------------------------------- SBERT


TEXT = ItemVectors({"d": (np.array([1, 2, 3, 4]), np.array([[1, 0], [0, 1], [1, 1], [2, -1]])),
                    "e": (np.array([1, 9]), np.array([[0, 2], [3, 3]]))})


def _sbert_rows(with_domains: bool = True) -> EvalSet:
    cols = {"user_id": [1, 2, 3, 4], "item_id": [4, 2, 3, 9], "domain": ["d", "d", "d", "e"],
            "history": pa.array([[2, 1], [3, 9], [9], [1, 4]], pa.list_(pa.int64()))}
    if with_domains:
        cols["history_domains"] = [["d", "d"], ["d", "e"], ["e"], ["e", "d"]]
    return EvalSet(pa.table(cols), {"d": np.array([1, 2, 3, 4]), "e": np.array([1, 9])}, name="sbert rows")


def test_sbert_scores_are_inner_products_with_the_last_in_domain_item():
    sc = baseline_scorer("sbert", _sbert_rows(), text=TEXT)
    users = {"row": torch.tensor([0, 1, 2])}
    # user vectors: row 0 <- d/1 = (1, 0); row 1 <- d/3 = (1, 1) (9 is in e); row 2 has no d history -> 0
    full = sc(users, torch.tensor([1, 2, 3, 4]), domain="d")
    assert full.tolist() == [[1, 0, 1, 2], [1, 1, 2, 1], [0, 0, 0, 0]]
    per_row = sc(users, torch.tensor([[4, 1], [2, 3], [1, 1]]), domain="d")
    assert per_row.tolist() == [[2, 1], [1, 2], [0, 0]]
    assert sc({"row": torch.tensor([3])}, torch.tensor([1, 9]), domain="e").tolist() == [[4, 6]]  # e/1 = (0, 2)
    # without history_domains the last history item is taken as is, as an item of the row's domain
    plain = _sbert_rows(with_domains=False)
    first = EvalSet(plain.rows.slice(0, 1), {"d": np.array([1, 2, 3, 4])}, name="x")
    assert SBERTScorer(first, TEXT)({"row": torch.tensor([0])}, torch.tensor([1, 2, 3, 4]), domain="d").tolist() \
        == [[1, 0, 1, 2]]
    second = EvalSet(plain.rows.slice(1, 1), {"d": np.array([1, 2, 3, 4])}, name="x")
    with pytest.raises(DataError, match="item 9 of domain 'd' has no text vector"):
        SBERTScorer(second, TEXT)  # its last item 9 is no item of d
    # through the evaluator: hr@1 is 1 (row 0), 0 (row 1: item 3 beats 2), 1/4 (row 2: a 4-way tie), 1 (row 3)
    res = evaluate(sc, _sbert_rows(), EvalConfig(ks=[1], exclude_history=False)).summary()["domains"]
    assert res["d"]["all"]["hr@1"] == pytest.approx(1.25 / 3) and res["e"]["all"]["hr@1"] == 1.0
    with pytest.raises(ValueError, match="'sbert' needs item text vectors"):
        baseline_scorer("sbert", _sbert_rows())


def _items_with_cached_vectors(tmp_path: Path) -> tuple[ModelData, str]:
    """An items table and a text cache already holding its (hand-made) vectors: nothing is encoded."""
    items = pa.table({"item_id": pa.array([1, 2, 3, 4], pa.int64()), "domain": ["d"] * 4,
                      "text": ["one", "two", "three", "four"]})
    (tmp_path / "items").mkdir()
    pq.write_table(items, tmp_path / "items" / "part-0.parquet")
    keys = item_keys(items).sort_by("item_id").select(KEYS)
    vecs = TEXT.vectors("d").astype(np.float32)
    cache = str(tmp_path / "text_cache")
    TextCache(cache).write_part(keys.append_column("embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(vecs.ravel()), 2)))
    return ModelData(np.arange(1, 5), ["d"], tables={"items": str(tmp_path / "items")},
                     extras={"cache_dir": str(tmp_path / "cache")}), cache


def test_engine_builds_sbert_from_the_items_table_and_text_cache(tmp_path):
    md, cache = _items_with_cached_vectors(tmp_path)
    assert np.array_equal(E.baseline_text(EvalSection(text_cache=cache), md).vectors("d"), TEXT.vectors("d"))
    data = EvalSet(_sbert_rows().rows.slice(0, 3), {"d": np.array([1, 2, 3, 4])}, name="sbert rows")
    tests = E.test_report(_Model(), None, data, EvalSection(ks=[1], baselines=["sbert"]), tmp_path / "out",
                          name="m", model_data=md, text_cache=cache)  # the model's cache, shared
    assert tests["sbert"]["full"]["overall"]["all"]["count"] == 3
    with pytest.raises(DataError, match=r"'sbert' needs item texts: the data has no 'items' side table"):
        E.baseline_text(EvalSection(), ModelData(np.arange(3), ["d"], tables={"interactions": "x"}))
