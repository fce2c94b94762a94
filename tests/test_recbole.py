"""RecBole atomic files: types, errors that name file and line, KG conversion, the real files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from xdtrain.data.movielens import source_file
from xdtrain.data.recbole import dense_ids, kg_tables, lookup_ids, read_atomic
from xdtrain.data.schemas import DataError, check_batch


def write(tmp_path, name: str, text: str, newline: str = "\n"):
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


SAMPLE = (
    "user_id:token\titem_id:token\trating:float\tscore:float\ttags:token_seq\temb:float_seq\ttitle:token_seq\n"
    "u1\ti1\t5\t0.5\ta b\t1 2.5\tToy Story\n"
    'u2\tThe "Item" (1995)\t3\t\t\t3\tGoldenEye\n'
    "u1\ti3\t4\t2\tc  d\t\tA  B\n"
)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_types_and_values(tmp_path, newline):
    t = read_atomic(write(tmp_path, "x.inter", SAMPLE, newline), keep_string=["title"])
    assert t.column_names == ["user_id", "item_id", "rating", "score", "tags", "emb", "title"]
    assert t.schema.field("user_id").type == pa.string()
    assert t.schema.field("rating").type == pa.int64()  # all integral -> int64
    assert t.schema.field("score").type == pa.float64()  # 0.5 -> float64; empty -> null
    assert t.schema.field("tags").type == pa.list_(pa.string())
    assert t.schema.field("emb").type == pa.list_(pa.float64())
    assert t.schema.field("title").type == pa.string()
    assert t.schema.field("tags").metadata == {b"recbole_type": b"token_seq"}
    assert t["item_id"].to_pylist() == ["i1", 'The "Item" (1995)', "i3"]  # quotes are plain characters
    assert t["rating"].to_pylist() == [5, 3, 4]
    assert t["score"].to_pylist() == [0.5, None, 2.0]
    assert t["tags"].to_pylist() == [["a", "b"], [], ["c", "d"]]  # empty tokens dropped
    assert t["emb"].to_pylist() == [[1.0, 2.5], [3.0], []]
    assert t["title"].to_pylist() == ["Toy Story", "GoldenEye", "A  B"]  # kept verbatim


def test_header_only_gives_empty_typed_table(tmp_path):
    t = read_atomic(write(tmp_path, "e.item", "item_id:token\tgenre:token_seq\n"))
    assert t.num_rows == 0
    assert t.schema.field("genre").type == pa.list_(pa.string())


@pytest.mark.parametrize(
    "text, expect",
    [
        (
            "user_id\titem_id:token\nu\ti\n",
            r"h\.inter: line 1, column 1 'user_id': header field is not 'name:type'",
        ),
        ("user_id:token\titem_id:int\nu\ti\n", r"h\.inter: line 1, column 'item_id': unknown type 'int'"),
        ("a:token\ta:token\nu\ti\n", r"h\.inter: line 1: duplicate column name"),
        ("", r"h\.inter: empty file"),
        (
            "a:token\tb:float\nu\t1\nv\t2\nw\n",
            r"h\.inter: line 4: expected 2 tab-separated fields \(a, b\), got 1",
        ),
        ("a:token\tb:float\nu\t1\nv\t2\t3\n", r"h\.inter: line 3: expected 2 .* got 3"),
        ("a:token\tb:float\nu\t1\nv\t2\nw\tfive\n", r"h\.inter: line 4, column 'b': 'five' is not a number"),
        ("a:token\tb:float_seq\nu\t1 2\nv\t2 x 3\n", r"h\.inter: line 3, column 'b': 'x' is not a number"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, text, expect):
    with pytest.raises(DataError, match=expect):
        read_atomic(write(tmp_path, "h.inter", text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.inter: file not found"):
        read_atomic(tmp_path / "nope.inter")


def test_dense_ids_first_appearance_from_one():
    codes, vocab = dense_ids(pa.array(["b", "a", "b", "c"]))
    assert codes.tolist() == [1, 2, 1, 3]
    assert vocab.to_pylist() == ["b", "a", "c"]
    assert lookup_ids(pa.array(["c", "b"]), vocab, 1, "f", "item").tolist() == [3, 1]
    with pytest.raises(DataError, match=r"f: line 4: item 'zz' is not defined"):
        lookup_ids(pa.array(["a", "b", "zz"]), vocab, 1, "f", "item")


def test_kg_tables_hand_example():
    kg = pa.table(
        {
            "head_id": ["m.x", "m.a", "m.y"],
            "relation_id": ["r1", "r2", "r1"],
            "tail_id": ["m.y", "m.x", "m.z"],
        }
    )
    link = pa.table({"item_id": ["20", "10"], "entity_id": ["m.a", "m.x"]})
    out = kg_tables(kg, link, pa.array(["10", "20", "30"]), np.array([10, 20, 30]), "toy")
    # Entities: linked first in .link order (m.a=1, m.x=2), then by first appearance in .kg (m.y=3, m.z=4).
    assert out["entities"]["raw_id"].to_pylist() == ["m.a", "m.x", "m.y", "m.z"]
    assert out["triplets"].to_pydict() == {"head": [2, 1, 3], "relation": [0, 1, 0], "tail": [3, 2, 4]}
    assert out["triplets"].schema.field("relation").type == pa.int32()
    assert out["relations"]["name"].to_pylist() == ["r1", "r2"]
    assert out["links"].to_pydict() == {"item_id": [20, 10], "entity_id": [1, 2]}
    check_batch(out["triplets"], "triplets", "toy")
    bad = pa.table({"item_id": ["99"], "entity_id": ["m.a"]})
    with pytest.raises(DataError, match=r"toy.link: line 2: item '99' is not defined"):
        kg_tables(kg, bad, pa.array(["10"]), np.array([10]), "toy")


def test_real_recbole_files():
    kg = read_atomic(source_file("ml-100k-kg", "kg"))
    assert kg.num_rows == 91631 and kg.column_names == ["head_id", "relation_id", "tail_id"]
    inter = read_atomic(source_file("ml-1m", "inter"))
    assert inter.num_rows == 1000209
    assert inter.schema.field("timestamp").type == pa.int64()
    assert inter.slice(0, 1).to_pylist() == [
        {
            "user_id": "1m_1",
            "item_id": "One Flew Over the Cuckoo's Nest (1975)",
            "rating": 5,
            "timestamp": 978300760,
        }
    ]
    item = read_atomic(source_file("ml-100k-kg", "item"))  # title declared token_seq: split on spaces
    assert item["movie_title"][0].as_py() == ["Toy", "Story"]
