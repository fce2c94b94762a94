"""Data recipes (xdtrain/data/recipes.py): splits and streams on hand-made tables, and the engine's
default data preparation against a fixture written before recipes existed. All fast, no Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from xdtrain.data.reader import ParquetStreamReader
from xdtrain.data.recipes import InteractionsSource, LocalRecipe, RecipeConfig, get_recipe
from xdtrain.data.schemas import DataError
from xdtrain.data.splits import assign_users
from xdtrain.models.prerec_data import split_by_domain
from xdtrain.train.config import DataConfig
from xdtrain.train.datasets import prepare_data

FIXTURE = Path(__file__).parent / "fixtures" / "prepare_loo"
PREPARE_CASES = {"default": {}, "filtered": dict(train_domains=["a", "b"], per_domain_catalogue=False,
                                                 max_train_samples=60, eval_domains=["a"], rows_per_group=4)}


def interactions_table() -> pa.Table:
    """40 users over domains a/b/c, 30 items, ties in time, every user with 3 rows or more."""
    rng = np.random.default_rng(7)
    users, items, doms, ts = [], [], [], []
    for u in range(40):
        n = int(rng.integers(3, 12))
        for k in range(n):
            d = "abc"[int(rng.integers(0, 2 if k < 3 else 3))]  # 3+ rows in a/b: train_domains=[a, b] keeps LOO whole
            users.append(100 + u)
            items.append(int(rng.integers(0, 10)) + 10 * "abc".index(d))
            doms.append(d)
            ts.append(int(rng.integers(0, 50)) * 10)
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
                     "domain": doms, "timestamp": pa.array(ts, pa.int64())})


def table(rows: list[tuple], **extra) -> pa.Table:
    """(user, item, domain, timestamp) rows, plus extra columns."""
    u, i, d, t = zip(*rows)
    return pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()), "domain": list(d),
                     "timestamp": pa.array(t, pa.int64()), **extra})


def prepare(rows: pa.Table, tmp_path: Path, tables: dict | None = None, **cfg):
    return LocalRecipe().prepare(InteractionsSource("hand", rows, tables=tables or {}), RecipeConfig(**cfg),
                                 tmp_path / "data")


def eval_view(evalset) -> list[tuple]:
    r = evalset.rows
    return list(zip(r["user_id"].to_pylist(), r["item_id"].to_pylist(), r["history"].to_pylist()))


def stream(out, name: str) -> pa.Table:
    return pq.read_table(out.streams[name].url)


# ---------------------------------------------------------------- the default: exactly as before recipes


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_default_recipe_reproduces_the_engine_data_before_recipes(tmp_path, case):
    url = tmp_path / "inter.parquet"
    pq.write_table(interactions_table(), url)
    cfg = DataConfig(source="parquet", interactions_url=str(url), **PREPARE_CASES[case])
    data = prepare_data(cfg, tmp_path / "run", min_groups=2)
    want = FIXTURE / case
    assert data.streams == {"train": data.train_url} and data.stream_tables == {"train": "sequences"}
    new, old = Path(data.train_url) / "part-00000.parquet", want / "train.parquet"
    assert pq.read_table(new).equals(pq.read_table(old))
    new_md, old_md = pq.ParquetFile(new).metadata, pq.ParquetFile(old).metadata
    assert [new_md.row_group(i).num_rows for i in range(new_md.num_row_groups)] == \
        [old_md.row_group(i).num_rows for i in range(old_md.num_row_groups)]
    if new_md.created_by == old_md.created_by:  # the same Parquet writer: the same bytes
        assert new.read_bytes() == old.read_bytes()
    for part in ("valid", "test"):
        got, meta = getattr(data, part), json.loads((want / f"{part}.json").read_text())
        assert got.rows.equals(pq.read_table(want / f"{part}.parquet"))
        assert got.name == meta["name"].replace("/tmp/rec/inter.parquet", str(url))  # the source path differs
        assert {d: c.tolist() for d, c in got.catalogue.items()} == meta["catalogue"]
        assert {d: c.tolist() for d, c in got.item_counts.items()} == meta["item_counts"]
    old_data = json.loads((want / "data.json").read_text())
    assert {k: data.stats[k] for k in old_data["stats"] if k != "source"} == \
        {k: v for k, v in old_data["stats"].items() if k != "source"}
    assert data.model_data.item_ids.tolist() == old_data["item_ids"] and data.model_data.domains == old_data["domains"]
    assert {d: c.tolist() for d, c in data.model_data.item_domains.items()} == old_data["item_domains"]


# ---------------------------------------------------------------- splits


def test_leave_one_out_per_domain_holds_out_each_domains_last_two(tmp_path):
    # user 1 alternates a (t=1,3,5) and b (t=2,4,6); user 2 has 2 items in a (too short: train only)
    rows = table([(1, 11, "a", 1), (1, 21, "b", 2), (1, 12, "a", 3), (1, 22, "b", 4), (1, 13, "a", 5),
                  (1, 23, "b", 6), (1, 7, "c", 7), (2, 11, "a", 1), (2, 12, "a", 2)])
    out = prepare(rows, tmp_path, name="leave_one_out_domain")
    # Each target's history is everything the user did before it, held-out items of other domains too.
    assert eval_view(out.valid) == [(1, 12, [11, 21]), (1, 22, [11, 21, 12])]
    assert eval_view(out.test) == [(1, 13, [11, 21, 12, 22]), (1, 23, [11, 21, 12, 22, 13])]
    seqs = stream(out, "train")
    assert seqs["items"].to_pylist() == [[11, 21, 7], [11, 12]]  # c's single item and user 2 stay in train
    assert seqs["domains"].to_pylist() == [["a", "b", "c"], ["a", "a"]]
    assert out.valid.rows["history_domains"].to_pylist()[1] == ["a", "b", "a"]
    assert out.stats["train_interactions"] == 5 and out.stats["recipe"] == "leave_one_out_domain"
    short = prepare(rows, tmp_path / "short", name="leave_one_out_domain", max_history=2)
    assert eval_view(short.test) == [(1, 13, [12, 22]), (1, 23, [22, 13])]
    # The global recipe on the same rows: user 1's last two overall
    glob = prepare(rows, tmp_path / "g")
    assert eval_view(glob.test) == [(1, 7, [11, 21, 12, 22, 13, 23])]
    assert eval_view(glob.valid) == [(1, 23, [11, 21, 12, 22, 13])]


def test_chronological_cut_times_put_the_boundary_in_the_later_part(tmp_path):
    rows = table([(1, 0, "a", 4), (1, 1, "a", 5), (1, 2, "a", 10), (1, 3, "a", 15), (1, 4, "a", 20), (1, 5, "a", 25),
                  (2, 6, "a", 9), (2, 7, "a", 19), (3, 8, "a", 12), (3, 9, "a", 30)])
    out = prepare(rows, tmp_path, name="chronological", times=[10, 20], streams=["train", "labelled"])
    # train < 10 <= valid < 20 <= test; every valid / test interaction is a target
    assert eval_view(out.valid) == [(1, 2, [0, 1]), (1, 3, [0, 1, 2]), (2, 7, [6])]  # user 3's t=12: no history
    assert eval_view(out.test) == [(1, 4, [0, 1, 2, 3]), (1, 5, [0, 1, 2, 3, 4]), (3, 9, [8])]
    assert out.stats["valid_rows_without_history"] == 1 and out.stats["cut_times"] == [10, 20]
    assert stream(out, "labelled")["timestamp"].to_pylist() == [4, 5, 9]
    assert stream(out, "train")["items"].to_pylist() == [[0, 1]]  # user 2's single train item predicts nothing


def test_chronological_ratios_choose_the_cut_times(tmp_path):
    rows = table([(u, u, "a", u + 1) for u in range(10)] + [(u, 100 + u, "a", 20 + u) for u in range(10)])
    out = prepare(rows, tmp_path, name="chronological", ratios=[0.5, 0.25, 0.25], streams=["labelled"])
    assert out.stats["cut_times"] == [20, 25]  # 10 rows before 20, 5 in [20, 25), 5 from 25 on
    assert eval_view(out.valid) == [(u, 100 + u, [u]) for u in range(5)]
    assert eval_view(out.test) == [(u, 100 + u, [u]) for u in range(5, 10)]
    with pytest.raises(DataError, match="leaves stream 'train' empty"):  # one train item per user
        prepare(rows, tmp_path / "t", name="chronological", ratios=[0.5, 0.25, 0.25], streams=["train"])


def test_user_split_is_disjoint_and_deterministic(tmp_path):
    rng = np.random.default_rng(3)
    rows = table([(u, int(i), "a", int(t)) for u in range(300) for i, t in zip(rng.integers(0, 50, 4),
                                                                                  rng.integers(0, 100, 4))])
    out = prepare(rows, tmp_path, name="user", ratios=[0.6, 0.2, 0.2], seed=5)
    train_users = set(stream(out, "train")["user_id"].to_pylist())
    valid_users, test_users = (set(s.rows["user_id"].to_pylist()) for s in (out.valid, out.test))
    assert not (train_users & valid_users) and not (train_users & test_users) and not (valid_users & test_users)
    part = assign_users(np.arange(300), [0.6, 0.2, 0.2], seed=5)
    assert valid_users == set(np.flatnonzero(part == 1).tolist())
    assert test_users == set(np.flatnonzero(part == 2).tolist())
    assert train_users == set(np.flatnonzero(part == 0).tolist())  # every train user has 4 items (>= 2)
    # one row per held-out user: its last interaction, the earlier three as history
    assert out.valid.num_rows == len(valid_users) and all(len(h) == 3 for _, _, h in eval_view(out.valid))
    again = prepare(rows, tmp_path / "again", name="user", ratios=[0.6, 0.2, 0.2], seed=5)
    assert again.valid.rows.equals(out.valid.rows) and stream(again, "train").equals(stream(out, "train"))
    other = prepare(rows, tmp_path / "other", name="user", ratios=[0.6, 0.2, 0.2], seed=6)
    assert set(other.valid.rows["user_id"].to_pylist()) != valid_users
    # item counts (POP) come from train users only
    train_rows = rows.filter(pa.array(part[rows["user_id"].to_numpy()] == 0))
    assert out.valid.item_counts["a"].sum() == train_rows.num_rows


# ---------------------------------------------------------------- streams


def test_labelled_rows_keep_label_and_observed(tmp_path):
    rows = table([(1, 1, "a", 1), (1, 2, "a", 2), (1, 3, "a", 3), (1, 4, "a", 4), (1, 5, "a", 5),
                  (2, 1, "a", 1), (2, 6, "a", 2), (2, 7, "a", 3)],
                 label=pa.array([1, 0, 1, 0, 1, 1, 1, 1], pa.int8()),
                 observed=[True, True, True, True, True, False, False, False])
    out = prepare(rows, tmp_path, streams=["labelled"])
    lab = stream(out, "labelled")
    assert lab.column_names == ["user_id", "item_id", "domain", "timestamp", "label", "observed"]
    assert lab.select(["user_id", "item_id", "label", "observed"]).to_pylist() == [
        {"user_id": 1, "item_id": 1, "label": 1, "observed": True},
        {"user_id": 1, "item_id": 2, "label": 0, "observed": True},
        {"user_id": 1, "item_id": 3, "label": 1, "observed": True},
        {"user_id": 2, "item_id": 1, "label": 1, "observed": False}]
    assert out.streams == {"labelled": out.streams["labelled"]} and out.streams["labelled"].table == "labelled"
    assert len(list(ParquetStreamReader(out.streams["labelled"].url, "labelled", batch_size=3))) == 2
    # Without the columns: label 1, observed from the users side table (user 2 unobserved)
    users = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "observed": [True, False]}), users)
    plain = prepare(rows.drop_columns(["label", "observed"]), tmp_path / "plain", tables={"users": str(users)},
                    streams=["labelled"])
    lab = stream(plain, "labelled")
    assert lab["label"].to_pylist() == [1, 1, 1, 1] and lab["observed"].to_pylist() == [True] * 3 + [False]


def test_items_stream_has_one_row_per_item_and_domain_with_text(tmp_path):
    rows = table([(1, 1, "a", 1), (1, 2, "a", 2), (1, 1, "b", 3), (1, 3, "b", 4), (2, 1, "a", 5), (2, 2, "a", 6),
                  (2, 3, "b", 7)])
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1, 2, 1, 9], "domain": ["a", "a", "b", "b"],
                             "text": ["one a", "two a", "one b", "nine b"]}), items)
    out = prepare(rows, tmp_path, tables={"items": str(items)}, streams=["train", "items"])
    got = stream(out, "items")
    assert got.to_pylist() == [{"item_id": 1, "domain": "a", "text": "one a"},
                               {"item_id": 2, "domain": "a", "text": "two a"},
                               {"item_id": 1, "domain": "b", "text": "one b"},
                               {"item_id": 3, "domain": "b", "text": None}]  # no text for (3, b); 9 is no item
    assert out.streams["items"].table == "items" and out.stats["items_rows"] == 4
    bare = prepare(rows, tmp_path / "bare", streams=["items"])
    assert stream(bare, "items")["text"].null_count == 4


def test_train_by_domain_rows_are_the_train_rows_split_per_domain(tmp_path):
    inter = interactions_table()
    out = prepare(inter, tmp_path, streams=["train", "train_by_domain"], rows_per_group=8)
    by = stream(out, "train_by_domain")
    assert by.column_names == ["user_id", "domain", "items", "timestamps"]
    assert out.streams["train_by_domain"].table == "sequences" and out.streams["train_by_domain"].rows == by.num_rows
    want = split_by_domain(stream(out, "train"))
    want = want.filter(pc.greater_equal(pc.list_value_length(want["items"]), 2))
    assert by.to_pylist() == want.sort_by([("user_id", "ascending"), ("domain", "ascending")]).to_pylist()
    assert out.stats["train_by_domain_rows"] == dict(Counter(by["domain"].to_pylist()))
    assert len(out.stats["train_by_domain_rows"]) == 3 and out.stats["train_sequences"] == stream(out, "train").num_rows
    # one domain: max_train_samples keeps the same samples in either stream (incremental fine-tuning)
    one = prepare(inter.filter(pc.equal(inter["domain"], "a")), tmp_path / "one",
                  streams=["train", "train_by_domain"], max_train_samples=20)
    cols = ["user_id", "items", "timestamps"]
    assert stream(one, "train").select(cols).to_pylist() == stream(one, "train_by_domain").select(cols).to_pylist()


def test_prepare_data_names_every_stream_and_rejects_bad_recipes(tmp_path):
    url = tmp_path / "inter.parquet"
    pq.write_table(interactions_table(), url)
    cfg = DataConfig(source="parquet", interactions_url=str(url), recipe="user", split_seed=1,
                     streams=["train", "labelled", "items"], flat_rows_per_group=50)
    data = prepare_data(cfg, tmp_path / "run", min_groups=2)
    assert data.train_url == data.streams["train"] and set(data.streams) == {"train", "labelled", "items"}
    assert data.stream_tables == {"train": "sequences", "labelled": "labelled", "items": "items"}
    for name, url in data.streams.items():  # each rank of 2 gets rows
        for rank in (0, 1):
            assert len(ParquetStreamReader(url, data.stream_tables[name], world_size=2, rank=rank)) > 0
    assert data.stats["recipe"] == "user" and {"new_user", "unseen"} <= set(data.valid.rows.column_names)
    with pytest.raises(DataError, match="data.recipe: unknown recipe 'random'"):
        prepare_data(DataConfig(source="parquet", interactions_url=str(url), recipe="random"), tmp_path / "r")
    with pytest.raises(DataError, match="data.streams: unknown stream"):
        prepare_data(DataConfig(source="parquet", interactions_url=str(url), streams=["pairs"]), tmp_path / "r")
    with pytest.raises(DataError, match="data.split_times"):
        get_recipe("chronological").prepare(InteractionsSource("x", interactions_table()),
                                            RecipeConfig(name="chronological", times=[5, 1]), tmp_path / "r")
