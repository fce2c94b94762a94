"""`EntityGraph`: the built entity graph (a DGL graph plus its id maps), saved and loaded as .npy files.

Structure (see docs/graph.md):
- nodes are dense ids 0..N-1; `node_ids[i]` is the raw entity id of node i (sorted ascending);
- edges are stored once, as CSC (in-edges per destination node), the only format DGL needs for
  in-edge neighbour sampling; COO and CSR are never materialised for the whole graph;
- edge ids are grouped by edge type: type t owns ids [etype_offsets[t], etype_offsets[t + 1]).
  Types are the R relations, then (with reverse edges) their R reverses, then (with self-loops)
  one "self" type. The edge type of an edge is therefore a lookup on its id, with no per-edge
  array, and DGL's `sample_etype_neighbors` can sample per relation. Within each node's
  in-edges, ids ascend, so they are sorted by type too;
- item -> entity links as CSR over sorted item ids.

On disk (any fsspec URL) a graph is a directory of .npy arrays plus `graph.json`, written last.
The directory is built under a temporary name and renamed, so a reader never sees half a graph.
Local graphs load memory-mapped: every Ray worker on a host shares one copy through the page cache.
Arrays are read with `allow_pickle=False` (no unpickling of user files).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import dgl
import numpy as np
import torch

from xdtrain.data.schemas import DataError
from xdtrain.outputs import AtomicFile, StagedDir, is_local, write_json_atomic
from xdtrain.ps.checkpoint import url_to_fs as url_to_fs  # re-exported to graph/

FORMAT = "xdtrain-entity-graph"
FORMAT_VERSION = 1
MANIFEST = "graph.json"
ARRAYS = ("indptr", "indices", "eids", "node_ids", "etype_offsets",
          "link_items", "link_offsets", "link_nodes")
INT32_MAX = np.iinfo(np.int32).max




def id_dtype(num_nodes: int, num_edges: int) -> np.dtype:
    """int32 when every node and edge id fits (halves the structure), else int64."""
    return np.dtype(np.int32) if max(num_nodes, num_edges) < INT32_MAX else np.dtype(np.int64)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only memory maps: DGL only reads the structure
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


@dataclass
class EntityGraph:
    """A built entity graph. `g` is homogeneous, CSC only, with `idtype` int32 where ids fit."""

    indptr: np.ndarray  # [N + 1] in-edge offsets per destination node
    indices: np.ndarray  # [E] source node of each in-edge, grouped by destination
    eids: np.ndarray  # [E] edge id of each in-edge (ids grouped by edge type)
    node_ids: np.ndarray  # [N] int64 raw entity id of each dense node, ascending
    etype_offsets: np.ndarray  # [T + 1] int64
    etype_names: list[str]
    n_relations: int
    reverse: bool
    self_loops: bool
    link_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted item ids
    link_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    link_nodes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    report: dict = field(default_factory=dict)  # build report: counts, bad triplets/links, files
    _g: dgl.DGLGraph | None = field(default=None, repr=False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def num_edges(self) -> int:
        return len(self.indices)

    @property
    def num_etypes(self) -> int:
        return len(self.etype_offsets) - 1

    @property
    def g(self) -> dgl.DGLGraph:
        """The DGL graph over the same memory (built on first use, restricted to CSC)."""
        if self._g is None:
            idt = torch.int32 if self.indices.dtype == np.int32 else torch.int64
            data = (_tensor(self.indptr), _tensor(self.indices), _tensor(self.eids))
            self._g = dgl.graph(("csc", data), num_nodes=self.num_nodes, idtype=idt).formats(["csc"])
        return self._g

    def nbytes(self) -> int:
        return sum(getattr(self, a).nbytes for a in ARRAYS)

    # ---- ids ---------------------------------------------------------------------------------
    def to_dense(self, raw_ids, strict: bool = True) -> np.ndarray:
        """Dense node ids of raw entity ids; unknown ids raise KeyError (or map to -1 if not strict)."""
        raw = np.asarray(raw_ids, dtype=np.int64)
        pos = np.searchsorted(self.node_ids, raw).clip(max=max(self.num_nodes - 1, 0))
        found = (self.node_ids[pos] == raw) if self.num_nodes else np.zeros(raw.shape, bool)
        if strict and not found.all():
            raise KeyError(f"entity ids not in the graph: {raw[~found][:5].tolist()}")
        return np.where(found, pos, -1).astype(self.indices.dtype)

    def to_raw(self, nodes) -> np.ndarray:
        """Raw entity ids of dense node ids."""
        if isinstance(nodes, torch.Tensor):
            nodes = nodes.numpy()
        return np.asarray(self.node_ids[np.asarray(nodes, dtype=np.int64)], dtype=np.int64)

    def edge_types(self, eids: torch.Tensor) -> torch.Tensor:
        """Edge type (int64) of each edge id: a search in the per-type id ranges."""
        offsets = torch.from_numpy(np.ascontiguousarray(self.etype_offsets[1:-1], dtype=np.int64))
        return torch.searchsorted(offsets, eids.to(torch.int64), right=True)

    def edge_list(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, edge type) of every edge, indexed by edge id (materialises E-sized arrays)."""
        dst = np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(self.indptr))
        order = np.argsort(self.eids, kind="stable")
        etype = np.searchsorted(self.etype_offsets, np.arange(self.num_edges), side="right") - 1
        return np.asarray(self.indices, dtype=np.int64)[order], dst[order], etype

    def in_degrees(self) -> np.ndarray:
        return np.diff(self.indptr)

    def item_nodes(self, item_ids) -> tuple[np.ndarray, np.ndarray]:
        """Linked entities of items: (offsets [n + 1], dense nodes); an unlinked item gets none."""
        items = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.link_items, items).clip(max=max(len(self.link_items) - 1, 0))
        found = (self.link_items[pos] == items) if len(self.link_items) else np.zeros(items.shape, bool)
        lo = np.where(found, self.link_offsets[pos], 0)
        hi = np.where(found, self.link_offsets[np.minimum(pos + 1, len(self.link_offsets) - 1)], 0)
        counts = hi - lo
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        take = np.repeat(lo - offsets[:-1], counts) + np.arange(offsets[-1])
        return offsets, np.asarray(self.link_nodes[take])

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "idtype": str(self.indices.dtype),
            "n_relations": self.n_relations,
            "reverse": self.reverse,
            "self_loops": self.self_loops,
            "etype_names": self.etype_names,
            "n_links": len(self.link_nodes),
            "report": self.report,
        }


def save_graph(graph: EntityGraph, url: str, overwrite: bool = False) -> str:
    """Write `graph` under `url` (a directory), atomically: staged under a temporary name, then swapped in.
    An existing graph is replaced only with `overwrite` and only if xdtrain wrote it."""
    with StagedDir(url, "graph", replace=overwrite, replace_key="overwrite") as stage:
        write_graph_files(graph, stage)
    return url


def write_graph_files(graph: EntityGraph, stage: StagedDir) -> None:
    """The arrays, then the manifest, into a staging folder."""
    files = {}
    for name in ARRAYS:
        arr = getattr(graph, name)
        with AtomicFile(f"{stage.path}/{name}.npy", stage.fs) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        files[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    write_json_atomic(f"{stage.path}/{MANIFEST}", {**graph.manifest(), "files": files}, stage.fs, indent=1)


def _read_npy(fs, path: str, local: bool, mmap: bool, expect: dict) -> np.ndarray:
    try:
        if local and mmap:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with fs.open(path, "rb") as f:
                arr = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read graph array ({e})") from None
    if str(arr.dtype) != expect["dtype"] or list(arr.shape) != expect["shape"]:
        raise DataError(
            f"{path}: expected {expect['dtype']} {expect['shape']}, found {arr.dtype} {list(arr.shape)}"
        )
    return arr


def load_graph(url: str, mmap: bool = True) -> EntityGraph:
    """Load a saved graph. Local files are memory-mapped (one copy per host) unless mmap=False."""
    fs, root = url_to_fs(url)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        raise FileNotFoundError(f"{path}: no saved graph (missing or incomplete)")
    with fs.open(path, "r") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest")
    local = is_local(fs)
    arrays = {name: _read_npy(fs, f"{root}/{name}.npy", local, mmap, meta["files"][name]) for name in ARRAYS}
    return EntityGraph(
        **arrays,
        etype_names=list(meta["etype_names"]),
        n_relations=int(meta["n_relations"]),
        reverse=bool(meta["reverse"]),
        self_loops=bool(meta["self_loops"]),
        report=meta.get("report", {}),
    )
