"""Build an `EntityGraph` from triplet Parquet at any fsspec URL, in bounded chunks, with progress bars.

    cfg = GraphBuildConfig(triplets="s3://kg/triplets/", links="s3://kg/links/", out="s3://kg/graph")
    summary = run_build_graph(cfg)            # build + save; `python -m jobs.build_graph` runs this
    graph = load_graph(cfg.out)

Three passes, none holding more than one Parquet chunk of raw rows:
1. read: check rows (bad ones raise or are reported, see triplets.py), collect the distinct entity
   ids and count triplets per relation. Dense node id = rank of the raw id (so `node_ids` is sorted
   and the remap is a lookup: an offset, a table, or a binary search, whichever the ids allow).
2. read again: remap to dense ids (int32 where they fit) and counting-sort each edge into its edge
   type's id range (forward relation r, reverse R + r, self-loops last). Edge ids are final here.
3. in memory: counting-sort the edges by destination into CSC, in edge-id order, so each node's
   in-edges are sorted by id and hence by type.
Memory: 16 bytes per directed edge at the peak (two int32 copies while sorting) plus 8 bytes per
entity, i.e. about 32 bytes per triplet with reverse edges; the bench measures it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from xdtrain.config import MISSING
from xdtrain.data.schemas import DataError
from xdtrain.outputs import StagedDir

from .store import EntityGraph, id_dtype, is_local, url_to_fs, write_graph_files
from .triplets import (
    BadReport,
    RelationVocab,
    TripletChecker,
    count_rows,
    decode_ids,
    iter_chunks,
    list_parquet,
)

_SORT_CHUNK = 1 << 22  # edges per step of the destination sort


@dataclass
class GraphBuildConfig:
    triplets: str = MISSING  # fsspec URL: a Parquet file or directory with head, relation, tail
    out: str = MISSING  # fsspec URL of the saved graph (a directory)
    links: str = ""  # optional item -> entity links (item_id, entity_id)
    entities: str = ""  # optional entity table (entity_id): every entity becomes a node, isolated or not,
    #                     and triplets naming other ids are bad (unknown_entity)
    reverse_edges: bool = True  # add tail -> head edges with their own relation types ("rev:<name>")
    self_loops: bool = False  # add one v -> v edge per node (type "self")
    n_relations: int = 0  # integer relations must lie in [0, n_relations); 0 = inferred (max + 1)
    relations: list[str] = field(default_factory=list)  # string relation vocabulary; empty = from data
    max_entity_id: int = -1  # entity ids above it are bad (out of range); -1 = no bound
    on_bad: Literal["raise", "skip"] = "raise"  # skip: drop bad rows and report them
    chunk_rows: int = 1 << 20
    progress: bool = True
    overwrite: bool = False


class _UniqueIds:
    """Distinct int64 ids seen so far: a bitmap while ids are small and non-negative, else sorted merges."""

    def __init__(self, bitmap_limit: int) -> None:
        self.limit = bitmap_limit
        self.seen: np.ndarray | None = np.zeros(0, dtype=bool)
        self.base = np.empty(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.seen is not None:
            lo, hi = int(ids.min()), int(ids.max())
            if lo >= 0 and hi < self.limit:
                if hi >= len(self.seen):
                    grown = np.zeros(max(hi + 1, 2 * len(self.seen)), dtype=bool)
                    grown[: len(self.seen)] = self.seen
                    self.seen = grown
                self.seen[ids] = True
                return
            self.base, self.seen = np.flatnonzero(self.seen).astype(np.int64), None
        u = np.unique(ids)
        self.pending.append(u)
        self.pending_n += len(u)
        if self.pending_n > max(len(self.base), 1 << 22):
            self._merge()

    def _merge(self) -> None:
        self.base = np.unique(np.concatenate([self.base, *self.pending]))
        self.pending, self.pending_n = [], 0

    def result(self) -> np.ndarray:
        if self.seen is not None:
            return np.flatnonzero(self.seen).astype(np.int64)
        self._merge()
        return self.base


class _Remap:
    """Raw ids (all known) -> dense ids: an offset for a contiguous range, a table for a compact one,
    a binary search otherwise."""

    def __init__(self, node_ids: np.ndarray, dtype: np.dtype) -> None:
        self.node_ids, self.dtype, self.table = node_ids, dtype, None
        self.lo = int(node_ids[0]) if len(node_ids) else 0
        span = int(node_ids[-1]) - self.lo + 1 if len(node_ids) else 0
        self.contiguous = span == len(node_ids)
        if not self.contiguous and span <= 4 * len(node_ids) + (1 << 20):
            self.table = np.full(span, -1, dtype=dtype)
            self.table[node_ids - self.lo] = np.arange(len(node_ids), dtype=dtype)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.contiguous:
            return (raw - self.lo).astype(self.dtype)
        if self.table is not None:
            return self.table[raw - self.lo]
        return np.searchsorted(self.node_ids, raw).astype(self.dtype)

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """Like calling it, but ids that are not nodes map to -1."""
        d = raw - self.lo
        if self.contiguous:
            return np.where((d >= 0) & (d < len(self.node_ids)), d, -1).astype(self.dtype)
        if self.table is not None:
            ok = (d >= 0) & (d < len(self.table))
            out = np.full(len(raw), -1, dtype=self.dtype)
            out[ok] = self.table[d[ok]]
            return out
        pos = np.searchsorted(self.node_ids, raw).clip(max=len(self.node_ids) - 1)
        return np.where(self.node_ids[pos] == raw, pos, -1).astype(self.dtype)


def _place(keys: np.ndarray, cursor: np.ndarray) -> np.ndarray:
    """Counting-sort positions: the i-th row with key k goes to cursor[k] + (its rank among this chunk's
    rows with key k); `cursor` advances. Stable, and no work proportional to the number of keys."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.ones(n, dtype=bool)
    start[1:] = sk[1:] != sk[:-1]
    first = np.flatnonzero(start)
    sizes = np.diff(np.append(first, n))
    group_first = np.repeat(first, sizes)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = cursor[sk] + (np.arange(n) - group_first)
    cursor[sk[first]] += sizes
    return pos


def _bar(progress: bool, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress, mininterval=1.0)


def _dest_sort(src: np.ndarray, dst: np.ndarray, n_nodes: int, dtype: np.dtype, progress: bool):
    """Edges in id order -> CSC (indptr, indices, eids), each node's in-edges in id order."""
    n_edges = len(src)
    deg = np.zeros(n_nodes, dtype=np.int64)
    for a in range(0, n_edges, 4 * _SORT_CHUNK):
        deg += np.bincount(dst[a : a + 4 * _SORT_CHUNK], minlength=n_nodes)
    indptr = np.zeros(n_nodes + 1, dtype=dtype)
    np.cumsum(deg, out=indptr[1:])
    del deg
    indices = np.empty(n_edges, dtype=dtype)
    eids = np.empty(n_edges, dtype=dtype)
    cursor = indptr[:-1].astype(np.int64)
    with _bar(progress, n_edges, "csc", "edge") as bar:
        for a in range(0, n_edges, _SORT_CHUNK):
            b = min(a + _SORT_CHUNK, n_edges)
            pos = _place(dst[a:b], cursor)
            indices[pos] = src[a:b]
            eids[pos] = np.arange(a, b, dtype=dtype)
            bar.update(b - a)
    return indptr, indices, eids


def build_graph(cfg: GraphBuildConfig) -> EntityGraph:
    """Triplets (+ links) -> EntityGraph in memory; see the module docstring for the passes."""
    t0, timings = time.time(), {}
    fs, paths = list_parquet(cfg.triplets)
    n_rows = count_rows(fs, paths)
    vocab = RelationVocab(cfg.n_relations, cfg.relations)
    entity_ids = read_entity_ids(cfg.entities, cfg.chunk_rows) if cfg.entities else None
    # node ids fit int32 far longer than edge ids; the edge arrays widen on assignment if needed
    remap = _Remap(entity_ids, id_dtype(len(entity_ids), 0)) if entity_ids is not None else None
    checker = TripletChecker(vocab, cfg.max_entity_id, cfg.on_bad, known=remap.lookup if remap else None)
    cols = ["head", "relation", "tail"]

    # Pass 1: distinct entities (unless given), triplets per relation, bad rows.
    uniq = _UniqueIds(bitmap_limit=max(8 * n_rows, 1 << 24)) if entity_ids is None else None
    rel_counts = np.zeros(0, dtype=np.int64)
    with _bar(cfg.progress, n_rows, "scan triplets", "row") as bar:
        for path, row0, batch in iter_chunks(fs, paths, "triplets", cols, cfg.chunk_rows):
            c = checker.check(batch, path, row0)
            if uniq is not None:
                uniq.add(c.head)
                uniq.add(c.tail)
            if len(c.relation):
                counts = np.bincount(c.relation)
                if len(counts) > len(rel_counts):
                    rel_counts = np.pad(rel_counts, (0, len(counts) - len(rel_counts)))
                rel_counts[: len(counts)] += counts
            bar.update(batch.num_rows)
    node_ids = entity_ids if uniq is None else uniq.result()
    del uniq
    if not rel_counts.sum():
        raise DataError(f"{cfg.triplets}: no valid triplets ({checker.report.summary()})")
    vocab.close(len(rel_counts) - 1)
    rel_counts = vocab.reorder_counts(rel_counts)
    R = vocab.n
    rel_counts = np.pad(rel_counts, (0, R - len(rel_counts)))
    timings["scan"] = time.time() - t0

    # Edge types and their id ranges.
    N = len(node_ids)
    names = vocab.type_names()
    type_counts = [rel_counts] + ([rel_counts] if cfg.reverse_edges else [])
    names += [f"rev:{n}" for n in names] if cfg.reverse_edges else []
    if cfg.self_loops:
        type_counts.append(np.array([N]))
        names.append("self")
    etype_offsets = np.concatenate([[0], np.cumsum(np.concatenate(type_counts))]).astype(np.int64)
    E = int(etype_offsets[-1])
    dtype = id_dtype(N, E)

    # Pass 2: remap and place every edge at its id (grouped by type).
    t1 = time.time()
    remap = remap or _Remap(node_ids, id_dtype(N, 0))
    src = np.empty(E, dtype=dtype)
    dst = np.empty(E, dtype=dtype)
    cursor = etype_offsets[:-1].copy()
    key_dtype = np.int16 if len(names) < (1 << 15) else np.int64  # small keys sort by radix
    with _bar(cfg.progress, n_rows, "place edges", "row") as bar:
        for path, row0, batch in iter_chunks(fs, paths, "triplets", cols, cfg.chunk_rows):
            c = checker.check(batch, path, row0, record=False)
            h, t, r = remap(c.head), remap(c.tail), c.relation.astype(key_dtype)
            pos = _place(r, cursor)
            src[pos], dst[pos] = h, t
            if cfg.reverse_edges:
                pos = _place(r + R, cursor)
                src[pos], dst[pos] = t, h
            bar.update(batch.num_rows)
    if cfg.self_loops:
        src[etype_offsets[-2] :] = dst[etype_offsets[-2] :] = np.arange(N, dtype=dtype)
        cursor[-1] = E
    if not np.array_equal(cursor, etype_offsets[1:]):
        raise DataError(f"{cfg.triplets}: the triplet files changed while the graph was being built")
    del remap
    checker.known = None  # frees the entity lookup table
    timings["place"] = time.time() - t1

    # Pass 3: CSC by destination.
    t2 = time.time()
    indptr, indices, eids = _dest_sort(src, dst, N, dtype, cfg.progress)
    del src, dst
    timings["csc"] = time.time() - t2

    report = {
        "triplets": {"url": cfg.triplets, "files": paths, "rows": n_rows,
                     "kept": n_rows - checker.report.total, "bad": checker.report.to_dict()},
    }
    graph = EntityGraph(indptr, indices, eids, node_ids, etype_offsets, names, R, cfg.reverse_edges,
                        cfg.self_loops, report=report)
    if cfg.links:
        t3 = time.time()
        graph.link_items, graph.link_offsets, graph.link_nodes, link_report = load_links(
            cfg.links, graph, cfg.on_bad, cfg.chunk_rows)
        report["links"] = link_report
        timings["links"] = time.time() - t3
    if checker.report.total:
        print(f"build_graph: {checker.report.summary()}", flush=True)
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return graph


def read_entity_ids(url: str, chunk_rows: int = 1 << 20) -> np.ndarray:
    """Sorted distinct ids of an entity table's `entity_id` column (a null id is an error)."""
    fs, paths = list_parquet(url)
    uniq = _UniqueIds(bitmap_limit=max(8 * count_rows(fs, paths), 1 << 24))
    for path, row0, batch in iter_chunks(fs, paths, None, ["entity_id"], chunk_rows):
        ids, null = decode_ids(batch.column("entity_id"))
        if null.any():
            first = row0 + int(np.argmax(null))
            raise DataError(f"{path}: row {first}: null entity_id ({int(null.sum())} in this chunk)")
        uniq.add(ids)
    ids = uniq.result()
    if not len(ids):
        raise DataError(f"{url}: the entity table is empty")
    return ids


def load_links(url: str, graph: EntityGraph, on_bad: str = "raise", chunk_rows: int = 1 << 20
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Item -> entity links as CSR over sorted item ids: (items, offsets, dense nodes, report).
    A link with a null id or an entity that is not in the graph is bad (raise, or skip and report)."""
    fs, paths = list_parquet(url)
    report = BadReport()
    items, nodes = [], []
    n_rows = 0
    for path, row0, batch in iter_chunks(fs, paths, "links", ["item_id", "entity_id"], chunk_rows):
        n_rows += batch.num_rows
        item_col, ent_col = batch.column("item_id"), batch.column("entity_id")
        item, i_null = decode_ids(item_col)
        ent, e_null = decode_ids(ent_col)
        node = graph.to_dense(ent, strict=False).astype(np.int64)
        kinds = {"null_id": i_null | e_null}
        kinds["unknown_entity"] = (node < 0) & ~kinds["null_id"]
        bad = kinds["null_id"] | kinds["unknown_entity"]
        for kind, mask in kinds.items():
            if not mask.any():
                continue
            j = int(np.argmax(mask))
            ex = {"row": row0 + j, "item_id": item_col[j].as_py(), "entity_id": ent_col[j].as_py()}
            if on_bad == "raise":
                raise DataError(f"{path}: row {row0 + j}: bad link ({kind}) {ex}; {int(bad.sum())} bad "
                                f"link(s) in rows {row0}-{row0 + batch.num_rows - 1} "
                                "(on_bad=skip drops and reports them)")
            report.add(path, kind, int(mask.sum()), ex)
        items.append(item[~bad])
        nodes.append(node[~bad])
    item = np.concatenate(items) if items else np.empty(0, np.int64)
    node = np.concatenate(nodes) if nodes else np.empty(0, np.int64)
    pairs = np.unique(np.stack([item, node], axis=1), axis=0) if len(item) else np.empty((0, 2), np.int64)
    link_items, counts = np.unique(pairs[:, 0], return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if report.total:
        print(f"build_graph links: {report.summary()}", flush=True)
    return (link_items.astype(np.int64), offsets, pairs[:, 1].astype(graph.indices.dtype),
            {"url": url, "files": paths, "rows": n_rows, "kept": len(pairs), "bad": report.to_dict()})


def run_build_graph(cfg: GraphBuildConfig) -> dict:
    """Job entrypoint (`python -m jobs.build_graph`): build, save, and summarise."""
    fs, root = url_to_fs(cfg.out)
    t0 = time.time()
    with StagedDir(cfg.out, "out", replace=cfg.overwrite, replace_key="overwrite") as stage:  # refuses first
        graph = build_graph(cfg)
        build_s = time.time() - t0
        write_graph_files(graph, stage)
    summary = {
        "out": cfg.out, "num_nodes": graph.num_nodes, "num_edges": graph.num_edges,
        "n_relations": graph.n_relations, "num_etypes": graph.num_etypes, "idtype": str(graph.indices.dtype),
        "graph_bytes": graph.nbytes(), "n_links": len(graph.link_nodes), "report": graph.report,
        "build_seconds": round(build_s, 3), "save_seconds": round(time.time() - t0 - build_s, 3),
    }
    if is_local(fs):
        summary["run_dir"] = root
    return summary


