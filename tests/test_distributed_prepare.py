"""The Ray Data preparation path (xdtrain/data/distributed.py) against the in-memory one: identical
streams, eval rows, catalogues and counts on a small log with duplicates, string ids, k-core
filtering, per-domain splits and a chronological cut; and the prepared-data manifest's reuse."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.data.schemas import DataError
from xdtrain.train.config import DataConfig
from xdtrain.train.datasets import prepare_data

pytestmark = pytest.mark.usefixtures("ray_cluster")

SORT = {"sequences": ["user_id", "domain"], "labelled": ["user_id", "timestamp", "item_id"],
        "items": ["domain", "item_id"]}


def make_log(folder, seed: int = 0, users: int = 120, t0: int = 0, t_span: int = 400) -> str:
    """Three domains, ~20 items each per user (zipf-ish items so k-core bites), integer timestamps with
    ties, a few exact duplicates, string user ids, labels; two files of several row groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for d, n_items in (("a", 60), ("b", 40), ("c", 30)):
            n = int(rng.integers(0, 12))
            items = np.minimum(rng.zipf(1.6, n), n_items) + {"a": 0, "b": 1000, "c": 2000}[d]
            for it in items:
                t = t0 + int(rng.integers(0, t_span))
                rows.append((f"u{u}", int(it), d, t, int(rng.integers(0, 2))))
    rows += rows[:7]  # exact duplicates
    order = rng.permutation(len(rows))
    t = pa.table({k: [rows[i][j] for i in order] for j, k in enumerate(["user_id", "item_id", "domain",
                                                                          "timestamp", "label"])})
    t = t.append_column("observed", pa.array(np.arange(t.num_rows) % 5 != 0))
    half = t.num_rows // 2
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.slice(0, half), folder / "f0.parquet", row_group_size=300)
    pq.write_table(t.slice(half), folder / "f1.parquet", row_group_size=300)
    return str(folder)


def table_of(url: str, kind: str) -> list:
    t = pq.read_table(url)
    return t.sort_by([(c, "ascending") for c in SORT[kind] if c in t.column_names]).to_pylist()


def both(tmp_path, url: str, **kw):
    cfg = dict(source="parquet", interactions_url=url, partition_rows=700, **kw)
    mem = prepare_data(DataConfig(prepare="memory", **cfg), tmp_path / "mem", min_groups=2)
    ray = prepare_data(DataConfig(prepare="ray", **cfg), tmp_path / "ray", min_groups=2)
    return mem, ray


def assert_same(mem, ray) -> None:
    assert mem.stats["prepared_by"] == "memory" and ray.stats["prepared_by"] == "ray"
    assert ray.stats["partitions"] > 1
    assert set(mem.streams) == set(ray.streams) and mem.stream_tables == ray.stream_tables
    for key, url in mem.streams.items():
        kind = mem.stream_tables[key]
        assert table_of(url, kind) == table_of(ray.streams[key], kind), key
        assert mem.model_data.extras["streams"][key] == ray.model_data.extras["streams"][key]
    for a, b in ((mem.valid, ray.valid), (mem.test, ray.test)):
        assert a.rows.num_rows > 0
        assert a.rows.to_pylist() == b.rows.to_pylist()  # the same rows in the same order
        assert a.rows.schema == b.rows.schema
        assert sorted(a.catalogue) == sorted(b.catalogue)
        for d in a.catalogue:
            np.testing.assert_array_equal(a.catalogue[d], b.catalogue[d])
            np.testing.assert_array_equal(a.item_counts[d], b.item_counts[d])
    np.testing.assert_array_equal(mem.model_data.item_ids, ray.model_data.item_ids)
    assert mem.model_data.domains == ray.model_data.domains
    assert mem.model_data.extras["train_domains"] == ray.model_data.extras["train_domains"]
    if "items" in mem.streams:  # one file either way: the same row groups
        assert pq.read_metadata(f"{ray.streams['items']}/part-00000.parquet").num_row_groups == \
            pq.read_metadata(f"{mem.streams['items']}/part-00000.parquet").num_row_groups > 1
    for k in ("users", "items", "interactions", "train_interactions", "valid_rows", "test_rows", "duplicates",
              "cut_times", "train_samples", "train_sequences", "train_by_domain_rows", "items_rows", "row_group_rows"):
        assert mem.stats.get(k) == ray.stats.get(k), k


def test_leave_one_out_with_duplicates_string_ids_k_core_and_domain_filters(tmp_path):
    url = make_log(tmp_path / "log")
    mem, ray = both(tmp_path, url, k_core=4, train_domains=["a", "b"], source_domains=["a"],
                    streams=["train", "labelled", "items"])
    assert mem.stats["duplicates"] > 0 and ray.stats["k_core_passes"] >= 1
    assert mem.stats["interactions"] < pq.read_metadata(f"{url}/f0.parquet").num_rows * 2 - 7  # k-core removed rows
    assert_same(mem, ray)
    assert ray.valid.rows["new_user"].to_pylist() == mem.valid.rows["new_user"].to_pylist()
    assert any(ray.valid.rows["new_user"].to_pylist())  # users with no domain-a interaction


def test_per_domain_leave_one_out_streams(tmp_path):
    url = make_log(tmp_path / "log", seed=1)
    mem, ray = both(tmp_path, url, recipe="leave_one_out_domain", max_history=5,
                    streams=["train_by_domain", "by_domain", "overlap"])
    assert {"domain.a", "domain.b", "domain.c", "overlap"} <= set(ray.streams)
    assert_same(mem, ray)


@pytest.mark.parametrize("recipe,extra", [("chronological", {"split_ratios": [0.7, 0.15, 0.15]}),
                                          ("user", {"split_ratios": [0.6, 0.2, 0.2], "split_seed": 3})])
def test_global_time_cut_and_user_split(tmp_path, recipe, extra):
    url = make_log(tmp_path / "log", seed=2)
    mem, ray = both(tmp_path, url, recipe=recipe, k_core=3, **extra)
    assert_same(mem, ray)


@pytest.mark.parametrize("t0,t_span", [(0, 400), (1_700_000_000_000_000_000, 6)])
def test_chronological_cut_times_are_exact_when_refined(tmp_path, monkeypatch, t0, t_span):
    """The histogram forced to refine (3 bins, collect at 10 values): the in-memory cut times, also
    with nanosecond-sized integer timestamps (past float64's 2^53) and hundreds of rows tied on the
    cut's timestamp."""
    import xdtrain.data.exact_rank as dist

    monkeypatch.setattr(dist, "HIST_BINS", 3)
    monkeypatch.setattr(dist, "COLLECT_MAX", 10)
    url = make_log(tmp_path / "log", seed=4, t0=t0, t_span=t_span)
    mem, ray = both(tmp_path, url, recipe="chronological", split_ratios=[0.5, 0.3, 0.2])
    assert_same(mem, ray)
    assert len(set(mem.valid.rows["timestamp"].to_pylist())) <= t_span  # the ties are there


def test_reuse_when_nothing_changed_and_prepare_again_when_something_did(tmp_path, capsys):
    url = make_log(tmp_path / "log", seed=3, users=40)
    cfg = DataConfig(source="parquet", interactions_url=url, prepare="auto", memory_max_rows=100,
                     partition_rows=400, eval_user_fraction=0.5)
    first = prepare_data(cfg, tmp_path / "run")
    assert first.stats["prepared_by"] == "ray"  # auto: the log has more rows than memory_max_rows
    manifest = tmp_path / "run" / "data" / "prepared.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepare_data(cfg, tmp_path / "run")
    assert "reusing" in capsys.readouterr().out and manifest.stat().st_mtime_ns == stamp
    assert again.valid.rows.to_pylist() == first.valid.rows.to_pylist()
    assert again.stats == {**first.stats, "reused": True}
    assert 0 < first.valid.rows.num_rows < len(set(pq.read_table(url)["user_id"].to_pylist()))  # half the users
    # a changed config prepares again, in memory this time, and replaces the partitioned stream
    mem = prepare_data(DataConfig(**{**cfg.__dict__, "prepare": "memory"}), tmp_path / "run")
    assert mem.stats["prepared_by"] == "memory" and manifest.stat().st_mtime_ns != stamp
    assert [p.name for p in (tmp_path / "run" / "data" / "train").glob("*.parquet")] == ["part-00000.parquet"]
    assert mem.valid.rows.to_pylist() == first.valid.rows.to_pylist()


def test_recipes_that_need_the_whole_log_are_refused_on_the_ray_path(tmp_path):
    url = make_log(tmp_path / "log", users=10)
    with pytest.raises(DataError, match="max_train_samples.*data.prepare=memory"):
        prepare_data(DataConfig(source="parquet", interactions_url=url, prepare="ray", max_train_samples=5),
                     tmp_path / "r")


def test_a_stream_folder_holding_other_files_is_refused_and_left_untouched(tmp_path):
    url = make_log(tmp_path / "log", users=30)
    mine = tmp_path / "run" / "data" / "train" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    with pytest.raises(DataError, match="notes.txt, not prepared data; it is left untouched"):
        prepare_data(DataConfig(source="parquet", interactions_url=url, prepare="ray", partition_rows=200),
                     tmp_path / "run")
    assert mine.read_text() == "keep me"
    data = tmp_path / "run" / "data"
    assert not list(data.glob(".stage-*")) and not list(data.glob(".work-*"))  # its own staging is gone


def test_bad_input_in_a_task_is_a_data_error_and_empty_partitions_keep_the_schema(tmp_path):
    url = make_log(tmp_path / "log", users=12)
    bad = pq.read_table(f"{url}/f1.parquet").to_pylist()
    bad[3]["item_id"] = None
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet.*item_id"):  # read in a shuffle task, named as itself
        prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "bad.parquet"), prepare="ray"),
                     tmp_path / "r0")
    with pytest.raises(DataError, match="duplicate"):
        prepare_data(DataConfig(source="parquet", interactions_url=url, prepare="ray", duplicates="error",
                                partition_rows=50), tmp_path / "r1")
    # string ids (hashed: the cleaned log is written) over far more partitions than users
    data = prepare_data(DataConfig(source="parquet", interactions_url=url, prepare="ray", partition_rows=8),
                        tmp_path / "r2")
    assert data.stats["partitions"] > 12
    from xdtrain.data.validate import read_dataset

    side = read_dataset(data.model_data.tables["interactions"], "interactions")[1]
    assert side.num_rows == data.stats["interactions"] and side.schema.field("domain").type == pa.string()


def test_a_failed_preparation_is_never_reused(tmp_path, capsys):
    url = make_log(tmp_path / "log", users=30)
    cfg = DataConfig(source="parquet", interactions_url=url, prepare="memory")
    prepare_data(cfg, tmp_path / "run")
    with pytest.raises(DataError):
        prepare_data(DataConfig(**{**cfg.__dict__, "k_core": 10_000}), tmp_path / "run")
    capsys.readouterr()
    again = prepare_data(cfg, tmp_path / "run")
    assert "reusing" not in capsys.readouterr().out and again.stats.get("reused") is None


def test_float_timestamps_map_to_int64_keys_in_order_and_back():
    from xdtrain.data.exact_rank import from_key as _from_key
    from xdtrain.data.exact_rank import to_key as _to_key

    v = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 2.25, 1.7e18, np.inf])
    keys = _to_key(v)
    assert (np.diff(keys) >= 0).all() and [_from_key(int(k), "float") for k in keys] == v.tolist()
    ints = np.array([-5, 0, 2**62], np.int64)
    assert _to_key(ints).tolist() == ints.tolist() and _from_key(2**62, "int") == 2**62
