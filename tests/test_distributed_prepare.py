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


def make_log(folder, seed: int = 0, users: int = 120) -> str:
    """Three domains, ~20 items each per user (zipf-ish items so k-core bites), integer timestamps with
    ties, a few exact duplicates, string user ids, labels; two files of several row groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for d, n_items in (("a", 60), ("b", 40), ("c", 30)):
            n = int(rng.integers(0, 12))
            items = np.minimum(rng.zipf(1.6, n), n_items) + {"a": 0, "b": 1000, "c": 2000}[d]
            for it in items:
                rows.append((f"u{u}", int(it), d, int(rng.integers(0, 400)), int(rng.integers(0, 2))))
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
    for k in ("users", "items", "interactions", "train_interactions", "valid_rows", "test_rows", "duplicates",
              "cut_times", "train_samples", "train_sequences", "train_by_domain_rows"):
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


def test_chronological_cut_times_are_exact_when_refined(tmp_path, monkeypatch):
    """Force the histogram to refine (2 bins, collect at 10 values): still the in-memory cut times."""
    import xdtrain.data.distributed as dist

    monkeypatch.setattr(dist, "HIST_BINS", 2)
    monkeypatch.setattr(dist, "COLLECT_MAX", 10)
    url = make_log(tmp_path / "log", seed=4)
    mem, ray = both(tmp_path, url, recipe="chronological", split_ratios=[0.5, 0.3, 0.2])
    assert_same(mem, ray)


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
