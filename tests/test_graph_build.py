"""Entity graph build: dense remap round-trips, CSC by hand, bad-triplet reporting, save/load, links, job."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph import GraphBuildConfig, build_graph, load_graph, save_graph
from xdtrain.data.schemas import DataError


def write(path, **cols) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return str(path)


def triplets_table(head, rel, tail):
    return {"head": pa.array(head, pa.int64()), "relation": pa.array(rel, pa.int32()),
            "tail": pa.array(tail, pa.int64())}


def build(tmp_path, **kw):
    return build_graph(GraphBuildConfig(out=str(tmp_path / "g"), progress=False, **kw))


def test_hand_example_csc(tmp_path):
    # raw ids 7, 55, 100 -> dense 0, 1, 2 (rank order)
    url = write(tmp_path / "t.parquet", **triplets_table([100, 7, 55, 100], [0, 1, 0, 1], [7, 55, 100, 55]))
    g = build(tmp_path, triplets=url)
    assert g.node_ids.tolist() == [7, 55, 100]
    assert g.etype_names == ["0", "1", "rev:0", "rev:1"]
    assert g.etype_offsets.tolist() == [0, 2, 4, 6, 8]
    # edge ids: type 0: (2->0) (1->2); type 1: (0->1) (2->1); rev:0: (0->2) (2->1); rev:1: (1->0) (1->2)
    assert g.indptr.tolist() == [0, 2, 5, 8]
    assert g.indices.tolist() == [2, 1, 0, 2, 2, 1, 0, 1]
    assert g.eids.tolist() == [0, 6, 2, 3, 5, 1, 4, 7]
    assert g.indices.dtype == np.int32 and g.g.idtype.is_signed and str(g.g.idtype) == "torch.int32"
    assert g.g.formats()["created"] == ["csc"]
    assert g.edge_types(g.g.in_edges(0, form="eid")).tolist() == [0, 3]


def _random_triplets(rng, n, n_ent, n_rel, id_scale=10**12):
    raw = rng.choice(np.arange(n_ent * 5), n_ent, replace=False).astype(np.int64) * id_scale // 97 + 3
    w = rng.pareto(1.2, n_ent) + 1
    p = w / w.sum()
    head, tail = raw[rng.choice(n_ent, n, p=p)], raw[rng.choice(n_ent, n, p=p)]
    return head, rng.integers(0, n_rel, n).astype(np.int32), tail


@pytest.mark.parametrize("id_scale", [1, 10**12])  # a remap table, and a binary search
def test_remap_round_trip_and_every_edge_kept(tmp_path, id_scale):
    rng = np.random.default_rng(0)
    h, r, t = _random_triplets(rng, 3000, 400, 6, id_scale)
    url = write(tmp_path / "t.parquet", **triplets_table(h, r, t))
    g = build(tmp_path, triplets=url, chunk_rows=257)  # chunks do not align with anything
    assert np.all(np.diff(g.node_ids) > 0) and set(g.node_ids) == set(h) | set(t)
    nodes = np.arange(g.num_nodes)
    assert np.array_equal(g.to_dense(g.to_raw(nodes)), nodes)
    assert np.array_equal(g.to_raw(g.to_dense(h)), h)
    src, dst, etype = g.edge_list()
    fwd = etype < 6
    got = Counter(zip(g.to_raw(src[fwd]), etype[fwd], g.to_raw(dst[fwd])))
    assert got == Counter(zip(h, r, t))
    rev = Counter(zip(g.to_raw(dst[~fwd]), etype[~fwd] - 6, g.to_raw(src[~fwd])))
    assert rev == Counter(zip(h, r, t))
    # each node's in-edges ascend by id, so by type (DGL's etype_sorted)
    for v in range(0, g.num_nodes, 37):
        seg = g.eids[g.indptr[v] : g.indptr[v + 1]]
        assert np.all(np.diff(seg) > 0)
    whole = build(tmp_path, triplets=url, chunk_rows=1 << 20)
    for name in ("indptr", "indices", "eids", "node_ids"):
        assert np.array_equal(getattr(g, name), getattr(whole, name)), name


def test_string_ids_and_relation_names(tmp_path):
    url = write(tmp_path / "t.parquet", head=["m.b", "m.a", "m.c"], relation=["film.genre", "actor", "actor"],
                tail=["m.a", "m.c", "m.b"])
    g = build(tmp_path, triplets=url, reverse_edges=False, self_loops=True)
    assert g.etype_names == ["actor", "film.genre", "self"]
    assert g.etype_offsets.tolist() == [0, 2, 3, 6]
    from xdtrain.data.schemas import hash_ids

    ids = hash_ids(["m.a", "m.b", "m.c"])
    src, dst, etype = g.edge_list()
    got = sorted(zip(g.to_raw(src).tolist(), etype.tolist(), g.to_raw(dst).tolist()))
    a, b, c = ids.tolist()
    want = sorted([(b, 1, a), (a, 0, c), (c, 0, b), (a, 2, a), (b, 2, b), (c, 2, c)])
    assert got == want


def test_bad_triplets_raise_naming_file_and_row(tmp_path):
    d = tmp_path / "trip"
    write(d / "part-0.parquet", **triplets_table([1, 2], [0, 1], [2, 3]))
    write(d / "part-1.parquet", head=pa.array([1, None, 4, 5, -3], pa.int64()),
          relation=pa.array([0, 0, 9, 1, 0], pa.int32()), tail=pa.array([3, 4, 1, 99, 1], pa.int64()))
    with pytest.raises(DataError) as e:
        build(tmp_path, triplets=str(d), n_relations=5, max_entity_id=50)
    msg = str(e.value)
    assert "part-1.parquet" in msg and "row 1" in msg and "null_id" in msg and "4 bad triplet(s)" in msg


def test_bad_triplets_skipped_and_reported(tmp_path):
    d = tmp_path / "trip"
    write(d / "part-0.parquet", **triplets_table([1, 2], [0, 1], [2, 3]))
    bad_file = write(d / "part-1.parquet", head=pa.array([1, None, 4, 5, -3, 2], pa.int64()),
                     relation=pa.array([0, 0, 9, 1, 0, None], pa.int32()),
                     tail=pa.array([3, 4, 1, 99, 1, 1], pa.int64()))
    g = build(tmp_path, triplets=str(d), n_relations=5, max_entity_id=50, on_bad="skip")
    bad = g.report["triplets"]["bad"]
    assert bad["total"] == 5
    assert bad["by_kind"] == {"null_id": 1, "null_relation": 1, "unknown_relation": 1, "id_out_of_range": 2}
    assert bad["by_file"] == {bad_file: bad["by_kind"]}
    assert {(x["kind"], x["row"]) for x in bad["examples"]} >= {("null_id", 1), ("unknown_relation", 2)}
    assert g.report["triplets"]["kept"] == 3
    assert g.num_edges == 2 * 3 and g.node_ids.tolist() == [1, 2, 3]  # ids of bad rows are not nodes


def test_entity_table_links_and_unknown_entities(tmp_path):
    trip = write(tmp_path / "t.parquet", **triplets_table([10, 20, 30], [0, 0, 1], [20, 30, 77]))
    ents = write(tmp_path / "e.parquet", entity_id=pa.array([10, 20, 30, 40], pa.int64()))
    links = write(tmp_path / "l.parquet", item_id=pa.array([5, 5, 6, 7, 6], pa.int64()),
                  entity_id=pa.array([10, 40, 30, 88, 30], pa.int64()))
    with pytest.raises(DataError, match="unknown_entity"):
        build(tmp_path, triplets=trip, entities=ents)
    g = build(tmp_path, triplets=trip, entities=ents, links=links, on_bad="skip")
    assert g.node_ids.tolist() == [10, 20, 30, 40]  # 40 is isolated but an entity
    assert g.report["triplets"]["bad"]["by_kind"] == {"unknown_entity": 1}
    assert g.report["links"]["bad"]["by_kind"] == {"unknown_entity": 1}  # item 7 -> 88
    assert g.report["links"]["kept"] == 3  # (6, 30) once
    offsets, nodes = g.item_nodes([6, 5, 7])
    assert offsets.tolist() == [0, 1, 3, 3] and nodes.tolist() == [2, 0, 3]


@pytest.mark.parametrize("url", ["memory://graphs/g1", "local"])
def test_save_load_round_trip(tmp_path, url):
    url = str(tmp_path / "saved") if url == "local" else url
    trip = write(tmp_path / "t.parquet", **triplets_table([1, 2, 3, 1], [0, 1, 0, 2], [2, 3, 1, 3]))
    links = write(tmp_path / "l.parquet", item_id=pa.array([9], pa.int64()),
                  entity_id=pa.array([3], pa.int64()))
    g = build(tmp_path, triplets=trip, links=links, self_loops=True)
    save_graph(g, url)
    with pytest.raises(FileExistsError):
        save_graph(g, url)
    back = load_graph(url)
    for name in ("indptr", "indices", "eids", "node_ids", "etype_offsets", "link_items", "link_nodes"):
        assert np.array_equal(getattr(back, name), getattr(g, name)), name
    assert back.etype_names == g.etype_names and back.report == json.loads(json.dumps(g.report))
    assert back.g.num_edges() == g.num_edges
    if not url.startswith("memory"):
        assert isinstance(back.indices, np.memmap)  # local graphs are shared through the page cache


def test_load_refuses_incomplete(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "indptr.npy").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="graph.json"):
        load_graph(str(tmp_path / "half"))


def test_build_graph_job(tmp_path, capsys):
    from jobs.build_graph import main

    trip = write(tmp_path / "t.parquet", **triplets_table([1, 2], [0, 0], [2, 3]))
    out = tmp_path / "g"
    assert main([f"triplets={trip}", f"out={out}", "progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_nodes"] == 3 and metrics["num_edges"] == 4
    assert load_graph(str(out)).num_edges == 4
    assert main([f"triplets={trip}", f"out={out}", "progress=false"]) == 2  # no silent overwrite
    bad = write(tmp_path / "bad.parquet", head=pa.array([1, None], pa.int64()),
                relation=pa.array([0, 0], pa.int32()), tail=pa.array([2, 3], pa.int64()))
    assert main([f"triplets={bad}", f"out={tmp_path / 'g2'}", "progress=false"]) == 2
    assert "bad.parquet: row 1" in capsys.readouterr().err
    assert not (tmp_path / "g2").exists()


def test_relation_vocabulary_given(tmp_path):
    d = tmp_path / "trip"
    write(d / "a.parquet", head=pa.array([1, 2], pa.int64()), relation=["likes", "knows"],
          tail=pa.array([2, 3], pa.int64()))
    b = write(d / "b.parquet", head=pa.array([3, 1], pa.int64()), relation=["likes", "hates"],
              tail=pa.array([1, 3], pa.int64()))
    g = build(tmp_path, triplets=str(d), relations=["knows", "likes"], reverse_edges=False, on_bad="skip")
    assert g.etype_names == ["knows", "likes"] and g.etype_offsets.tolist() == [0, 1, 3]
    assert g.report["triplets"]["bad"]["by_file"] == {b: {"unknown_relation": 1}}
    open_vocab = build(tmp_path, triplets=str(d), reverse_edges=False)  # names from the data, sorted
    assert open_vocab.etype_names == ["hates", "knows", "likes"]
    assert open_vocab.etype_offsets.tolist() == [0, 1, 2, 4]


def test_shipped_configs_load():
    from xdtrain.config import load_config
    from xdtrain.data.synthetic import WorldConfig, validate

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("graph_ml100k", "graph_world_1e8_build"):
        cfg = load_config(GraphBuildConfig, configs / f"{name}.yaml")
        assert cfg.reverse_edges and cfg.on_bad == "raise"
    world = load_config(WorldConfig, configs / "graph_world_1e8.yaml", ["out=unused"])
    validate(world)
    gr = world.graph
    assert (gr.n_triplets, gr.n_entities, gr.n_relations) == (10**8, 15 * 10**6, 100)
