"""Two-domain data: the CSV row format, overlap-rate resampling, the by_domain / overlap recipe streams."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from xdtrain.data.recipes import InteractionsSource, LocalRecipe, RecipeConfig
from xdtrain.data.schemas import DataError
from xdtrain.data.synthetic.two_domain import TwoDomainWorld, two_domain_world
from xdtrain.data.two_domain import overlap_users, read_two_domain_csv, resample_overlap, two_domain_interactions

CSV = """user_id,seq_d1,seq_d2,domain_id,ob_label
7,"[3, 9, 4]","[]",0,1
8,"[5, 1]","[12, 40, 2]",0,0
8,"[5, 1]","[12, 40, 2]",1,1
"""


def test_csv_rows_become_canonical_interactions_in_list_order(tmp_path):
    path = tmp_path / "pair.csv"
    path.write_text(CSV)
    rows = read_two_domain_csv(path)
    assert rows.column_names == ["user_id", "seq_d1", "seq_d2", "domain_id", "ob_label"]
    assert rows["seq_d2"].to_pylist() == [[], [12, 40, 2], [12, 40, 2]]
    inter = two_domain_interactions(rows, ("movie", "book"))
    got = sorted(zip(*(inter[c].to_pylist() for c in ("user_id", "domain", "timestamp", "item_id", "observed"))))
    assert got == [(7, "movie", 0, 3, True), (7, "movie", 1, 9, True), (7, "movie", 2, 4, True),
                   (8, "book", 0, 12, True), (8, "book", 1, 40, True), (8, "book", 2, 2, True),
                   (8, "movie", 0, 5, True), (8, "movie", 1, 1, True)]  # user 8 is observed in one of its rows
    assert overlap_users(inter).tolist() == [8]


@pytest.mark.parametrize("text, match", [
    ("user_id,seq_d1,domain_id\n1,[],0\n", r"missing column\(s\) \['seq_d2'\]"),
    ('user_id,seq_d1,seq_d2,domain_id\n1,"[1, 2]","[x]",0\n', "row 2 column seq_d2: not a JSON list"),
    ('user_id,seq_d1,seq_d2,domain_id\n1,"[1]","[2]",0\n2,"[1.5]","[]",1\n', "row 3 column seq_d1: expected a JSON"),
    ('user_id,seq_d1,seq_d2,domain_id\n1,"[1]","[2]",2\n', "row 2 column domain_id: expected 0 or 1"),
])
def test_bad_csv_cells_name_file_row_and_column(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_two_domain_csv(path)


def test_rows_of_one_user_must_agree(tmp_path):
    path = tmp_path / "pair.csv"
    path.write_text('user_id,seq_d1,seq_d2,domain_id\n1,"[1]","[2]",0\n1,"[1]","[3]",1\n')
    with pytest.raises(DataError, match="user 1's rows disagree on seq_d2"):
        two_domain_interactions(read_two_domain_csv(path))


def counts(inter: pa.Table) -> dict[tuple[int, str], int]:
    """Interactions per (user, domain)."""
    g = inter.group_by(["user_id", "domain"]).aggregate([("item_id", "count")])
    return dict(zip(zip(g["user_id"].to_pylist(), g["domain"].to_pylist()), g["item_id_count"].to_pylist()))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5])
def test_overlap_resampling_keeps_the_distinct_user_total(rate):
    inter, _ = two_domain_world(TwoDomainWorld(users_a=200, users_b=300, overlap=0.6, items_a=40, items_b=40,
                                               len_b=(4, 6)))
    before = len(pc.unique(inter["user_id"]))
    out = resample_overlap(inter, rate, reference="a", seed=3)
    assert len(pc.unique(out["user_id"])) == before
    assert len(overlap_users(out)) == round(rate * 200)
    # a demoted user keeps all of one domain's interactions and none of the other's
    old, new = counts(inter), counts(out)
    assert all(old[k] == n for k, n in new.items())
    again = resample_overlap(inter, rate, reference="a", seed=3)
    assert again.equals(out)


def test_overlap_resampling_refuses_more_overlap_than_there_is():
    inter, _ = two_domain_world(TwoDomainWorld(users_a=50, users_b=60, overlap=0.2, items_a=20, items_b=20,
                                               len_b=(4, 5)))
    with pytest.raises(DataError, match="only 10 users are in both domains"):
        resample_overlap(inter, 0.5, reference="a")


def test_by_domain_and_overlap_streams(tmp_path):
    inter, _ = two_domain_world(TwoDomainWorld(users_a=40, users_b=60, overlap=0.25, items_a=30, items_b=30,
                                               len_b=(5, 8)))
    out = LocalRecipe().prepare(InteractionsSource("w", inter),
                                RecipeConfig(name="leave_one_out_domain", streams=["by_domain", "overlap"]), tmp_path)
    assert set(out.streams) == {"domain.a", "domain.b", "overlap"}
    a = pads.dataset(out.streams["domain.a"].url).to_table()
    assert a.num_rows == 40 and set(a["domain"].to_pylist()) == {"a"}
    o = pads.dataset(out.streams["overlap"].url).to_table()
    assert o.num_rows == 10
    assert all({"a", "b"} == set(d) for d in o["domains"].to_pylist())
    # per (user, domain) the last two items are held out: each domain's train sequence is 2 shorter
    full = counts(inter)
    assert all(len(s) == full[(u, "a")] - 2 for u, s in zip(a["user_id"].to_pylist(), a["items"].to_pylist()))


def test_zero_overlap_writes_no_overlap_stream(tmp_path):
    inter, _ = two_domain_world(TwoDomainWorld(users_a=30, users_b=30, overlap=0.0, items_a=20, items_b=20,
                                               len_b=(4, 5)))
    out = LocalRecipe().prepare(InteractionsSource("w", inter),
                                RecipeConfig(name="leave_one_out_domain", streams=["by_domain", "overlap"]), tmp_path)
    assert "overlap" not in out.streams and out.stats["overlap_rows"] == 0
    assert np.all(np.asarray(out.item_ids) >= 1)
    assert isinstance(out.valid.rows, pa.Table)


def test_amazon_filters_core_and_recoding(tmp_path):
    from xdtrain.data.amazon import AmazonConfig, amazon_pair, pair_stats

    T = 1506816000
    lines = []
    for u in range(5):  # users u0..u4 each review items i0..i4 after the cut: a 5-core
        for i in range(5):
            lines.append({"reviewerID": f"u{u}", "asin": f"i{i}", "overall": 5.0, "unixReviewTime": T + 1 + 10 * u + i,
                          "verified": True})
    lines += [
        {"reviewerID": "u0", "asin": "i9", "overall": 2.0, "unixReviewTime": T + 99, "verified": True},  # rating
        {"reviewerID": "u0", "asin": "i8", "overall": 4.0, "unixReviewTime": T, "verified": True},  # not after
        {"reviewerID": "u0", "asin": "i7", "overall": 4.0, "unixReviewTime": T + 5, "verified": False},  # unverified
        {"reviewerID": "u5", "asin": "i0", "overall": 4.0, "unixReviewTime": T + 7, "verified": True},  # < 5 items
        {"reviewerID": "u1", "asin": "i6", "overall": 4.0, "unixReviewTime": T + 8, "verified": True},  # < 5 users
    ]
    sport = tmp_path / "sport.json"
    sport.write_text("\n".join(json.dumps(r) for r in lines))
    cloth = tmp_path / "cloth.json"
    cloth.write_text("\n".join(json.dumps({"reviewerID": f"u{u}", "asin": f"c{i}", "overall": 3.0,
                                           "unixReviewTime": T + 1 + i, "verified": True})
                               for u in (3, 4, 6, 7, 8) for i in range(5)))
    inter = amazon_pair({"sport": sport, "cloth": cloth}, AmazonConfig())
    stats = pair_stats(inter)
    assert stats["sport"] == {"users": 5, "items": 5, "avg_len": 5.0, "overlap": 2}
    assert stats["cloth"]["users"] == 5
    for d in ("sport", "cloth"):  # items re-coded 1..|V| per domain
        assert sorted(set(inter.filter(pc.equal(inter["domain"], d))["item_id"].to_pylist())) == [1, 2, 3, 4, 5]
    # without the verified filter and the core: i7, i6 and u5 come back
    unverified = amazon_pair({"sport": sport}, AmazonConfig(verified_only=False, k_core=1))
    assert pair_stats(unverified)["sport"] == {"users": 6, "items": 7, "avg_len": round(28 / 6, 3), "overlap": 0}


def test_amazon_bad_line_names_file_and_line(tmp_path):
    from xdtrain.data.amazon import AmazonConfig, read_reviews

    path = tmp_path / "r.json"
    path.write_text('{"reviewerID": "u", "asin": "i", "overall": 5, "unixReviewTime": 1}\n{"asin": "i"}\n')
    with pytest.raises(DataError, match="r.json line 2"):
        read_reviews(path, AmazonConfig())
