"""Scoring from exported vectors: what a model's `export` hook wrote, without the model.

    tables = {name: read_export(url) for name, url in summary["embeddings"].items()}
    result = evaluate(export_scorer(tables["user"], tables["item"]), test_set, EvalConfig())

An exported table has an int64 `id`, a float32 fixed-size-list `vector`, and optionally a string
`domain` (then ids are distinct per domain: PreRec's item vectors differ by domain). A row's score
is the dot product of its user vector (looked up by `user_id`, within its domain when the user
table has a domain column) and the item's vector (within the domain when the item table has one).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from xdtrain.eval.evaluator import EmbeddingScorer, EvalError


def vector_table(ids: np.ndarray | Tensor, vectors: np.ndarray | Tensor, domain: str | None = None) -> pa.Table:
    """(id, vector[, domain]) in the layout of PS exports (id int64, vector fixed_size_list<float32>)."""
    ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64)
    vecs = vectors.detach().cpu().numpy() if isinstance(vectors, Tensor) else np.asarray(vectors)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if vecs.ndim != 2 or len(vecs) != len(ids):
        raise ValueError(f"vector_table: {len(ids)} ids but vectors of shape {tuple(vecs.shape)}")
    cols = {"id": pa.array(ids, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])}
    if domain is not None:
        cols["domain"] = pa.array([domain] * len(ids), pa.string())
    return pa.table(cols)


def keys_table(by_domain: dict[str, np.ndarray]) -> pa.Table:
    """(id, domain) of every id of every domain, domains in sorted order (an export's catalogue keys)."""
    doms = sorted(by_domain)
    ids = [np.asarray(by_domain[d], dtype=np.int64) for d in doms]
    which = np.repeat(np.arange(len(doms)), [len(i) for i in ids])
    return pa.table({"id": pa.array(np.concatenate(ids) if ids else np.zeros(0, np.int64), pa.int64()),
                     "domain": pc.take(pa.array(doms, pa.string()), pa.array(which, pa.int64()))})


def _by_domain(table: pa.Table, what: str) -> dict[str | None, tuple[Tensor, Tensor]]:
    """{domain (None: all rows): (ids, vectors)}; ValueError on an id repeated within a domain."""
    doms = table.column("domain").to_pylist() if "domain" in table.column_names else [None] * table.num_rows
    ids = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
    vec = pc.list_flatten(table.column("vector")).to_numpy().astype(np.float32, copy=False)
    vec = vec.reshape(table.num_rows, -1) if table.num_rows else vec.reshape(0, 0)
    out = {}
    doms_arr = np.asarray(doms, dtype=object)
    for d in dict.fromkeys(doms):
        sel = np.flatnonzero(doms_arr == d) if d is not None else np.arange(table.num_rows)
        uniq, counts = np.unique(ids[sel], return_counts=True)
        if (counts > 1).any():
            where = f" in domain {d!r}" if d is not None else ""
            raise ValueError(f"exported {what} vectors: id {int(uniq[counts > 1][0])} appears twice{where}")
        out[d] = (torch.from_numpy(ids[sel]), torch.from_numpy(vec[sel]))
    return out


class ExportScorer:
    """A `Scorer` over exported user and item tables (see the module docstring)."""

    def __init__(self, user: pa.Table, item: pa.Table, key: str = "user_id") -> None:
        self.users, self.items, self.key = _by_domain(user, "user"), _by_domain(item, "item"), key
        self._scorers: dict[str, EmbeddingScorer] = {}

    def _scorer(self, domain: str) -> EmbeddingScorer:
        if domain not in self._scorers:
            parts = []
            for what, table in (("user", self.users), ("item", self.items)):
                part = table.get(None, table.get(domain))
                if part is None:
                    raise EvalError(f"exported {what} vectors have no domain {domain!r} (they have {sorted(table)})")
                parts.append(part)
            (uk, uv), (ik, iv) = parts
            self._scorers[domain] = EmbeddingScorer(uk, uv, ik, iv, key=self.key)
        return self._scorers[domain]

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        return self._scorer(domain)(users, items, domain=domain)


def export_scorer(user: pa.Table, item: pa.Table, key: str = "user_id") -> ExportScorer:
    """Score eval rows from exported `user` and `item` tables (e.g. `read_export` of the engine's
    run_dir/embeddings/user-step<N> and item-step<N>)."""
    return ExportScorer(user, item, key)
