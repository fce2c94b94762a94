"""Sparse features: how a model reaches embedding rows that live in a parameter server.

The model contract (DESIGN.md "Contracts"); every method in `xdtrain/models/` follows it, and the
engine (`xdtrain/train/`) knows models only through it:

    class MyModel(nn.Module):                       # the dense part; DDP wraps it
        def sparse_tables(self) -> list[TableSpec]  # PS tables it needs (name, dim, init, optimizer)
        def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict[str, Tensor]
            # rows of the training dataset (e.g. user sequences) -> model inputs, negatives drawn here
        def sparse_ids(self, batch) -> dict[str, Tensor]   # table -> every raw id this batch touches
        def forward(self, batch, emb: dict[str, Rows]) -> Tensor   # the scalar training loss
        def scorer(self, rows: pa.Table, pull: Pull) -> Scorer     # evaluation (xdtrain.eval Scorer)
        def export(self, pull: Pull, users: pa.Table | None = None) -> dict[str, pa.Table]   # optional
            # named vector tables (xdtrain.eval.exported.vector_table: id, vector[, domain]), e.g.
            # "item", and "user" for `users` rows (user_id, history, ...) when the model can compute
            # them. The engine writes each under run_dir/embeddings/<name>-step<N>/ (else it exports
            # the raw PS tables); `xdtrain.eval.exported.export_scorer` scores eval rows from them.
        def export_keys(self) -> dict[str, pa.Table]                 # optional, with export_part:
        def export_part(self, name, rows: pa.Table, pull) -> pa.Table   # `export` in chunks
            # export_keys: each catalogue table's keys (id[, domain]), every row to embed, e.g. "item";
            # export_part: the vectors of a chunk of those keys, or of user rows for name "user".
            # The refresh job (xdtrain/refresh/) runs export_part on Ray Data workers; `export_from_parts`
            # is the whole `export` of such a model.

A model may also declare a training program (several streams, optimizers and phases; named
losses; `forward(batch, emb, step=...)`, `make_batch(rows, rng, stream=...)`): see
`xdtrain/nn/program.py`. Without those hooks it gets one stream, one Adam and one phase.

One training step, whatever the backend (`LocalPS` in-process or `PSClient` over Ray actors):

    batch = model.make_batch(rows, rng)
    emb = pull_rows(ps, model.sparse_ids(batch))     # one deduplicated pull per table
    loss = model(batch, emb); loss.backward()        # row gradients land in emb[t].weight.grad
    push_grads(ps, emb)                               # the PS optimizer steps the rows
    dense_optimizer.step()

Ids are raw int64 (strings are hashed once at ingestion); the PS admits unseen ids itself.
`Pull` is `pull(table, ids) -> Tensor` with no gradient (evaluation, export).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

Pull = Callable[[str, np.ndarray], Tensor]

# Raw ids are arbitrary int64 (0 is a real id in some datasets), so padding in id tensors is -1.
PAD_ID = -1


class Rows:
    """The rows of one table pulled for one batch: sorted unique ids and a leaf `weight` [n, d] that
    collects their gradients. Calling it maps any-shaped raw ids to embeddings ([*ids.shape, d]).

    `pad`: an id (e.g. 0 for right-padded sequences) whose embedding is a constant zero vector.
    """

    def __init__(self, ids: np.ndarray, weight: Tensor, pad: int | None = None) -> None:
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(weight.device)
        if self.ids.numel() > 1 and not bool((self.ids[1:] > self.ids[:-1]).all()):
            raise ValueError("Rows ids must be sorted and unique")
        if weight.shape[0] != self.ids.numel():
            raise ValueError(f"Rows: {self.ids.numel()} ids but weight has {weight.shape[0]} rows")
        self.weight = weight
        self.pad = pad

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def index(self, ids: Tensor) -> Tensor:
        """Positions of `ids` in this batch's rows; an id that was not pulled is an error."""
        flat = ids.reshape(-1).to(torch.int64)
        pos = torch.searchsorted(self.ids, flat).clamp(max=max(self.ids.numel() - 1, 0))
        if self.ids.numel() == 0 or not bool((self.ids[pos] == flat).all()):
            missing = flat[(self.ids.numel() == 0) | (self.ids[pos] != flat)][:5].tolist()
            raise KeyError(f"ids {missing} were not pulled for this batch (sparse_ids must list every id)")
        return pos.reshape(ids.shape)

    def __call__(self, ids: Tensor) -> Tensor:
        out = self.weight[self.index(ids)]
        if self.pad is not None:
            out = out * (ids != self.pad).unsqueeze(-1).to(out.dtype)
        return out

    def grad(self) -> np.ndarray:
        """Row gradients as float32 [n, d] (zeros when nothing reached these rows)."""
        g = self.weight.grad
        if g is None:
            return np.zeros(tuple(self.weight.shape), dtype=np.float32)
        return g.detach().to(torch.float32).cpu().numpy()


def unique_ids(ids: Tensor | np.ndarray) -> np.ndarray:
    """Sorted unique int64 ids of any-shaped input."""
    arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    return np.unique(arr.astype(np.int64, copy=False).reshape(-1))


def pull_rows(ps: Any, ids_by_table: dict[str, Tensor | np.ndarray], pads: dict[str, int] | None = None,
              requires_grad: bool = True, device: torch.device | str | None = None) -> dict[str, Rows]:
    """Pull every table's unique ids (one deduplicated request per table) into trainable `Rows`
    (on `device` when given: the worker's GPU)."""
    out = {}
    for table, ids in ids_by_table.items():
        uniq = unique_ids(ids)
        routed = _routed(ps, uniq)
        if routed is None or routed.order is None:
            weight = ps.pull(table, uniq if routed is None else routed).detach().clone()
        else:  # rows come grouped by shard; putting them back in id order replaces the clone
            rows = ps.pull(table, routed)
            weight = torch.empty_like(rows).index_copy_(0, torch.from_numpy(routed.order), rows)
        if device is not None:
            weight = weight.to(device, non_blocking=True)
        out[table] = Rows(uniq, weight.requires_grad_(requires_grad), (pads or {}).get(table))
    return out


def _routed(ps: Any, uniq: np.ndarray):
    """`uniq` grouped by PS shard (`RoutedIds`) when the backend routes ahead of time, else None:
    each shard then writes its rows as one block, and the client skips its own routing."""
    route = getattr(ps, "route", None)
    return route(uniq) if route is not None else None


RowGrads = dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (sorted ids [n], gradients [n, d])


def row_grads(rows: dict[str, Rows]) -> RowGrads:
    """Each table's rows the loss reached, with their gradients (float32). Rows whose gradient is all
    zero (pulled, but the loss did not reach them: a detached input, the branch torch.where dropped, a
    padding row) are left out: a stateful PS optimizer would step them on its momentum alone (Adam
    moves a row about 2/3 of a step on a zero push), as lazy sparse Adam never does."""
    out = {}
    for table, r in rows.items():
        if r.ids.numel() == 0 or r.weight.grad is None:
            continue
        g = r.grad()
        ids = r.ids.cpu().numpy()
        reached = g.any(axis=1)
        if not reached.all():
            ids, g = ids[reached], g[reached]
        if len(ids):
            out[table] = (ids, g)
    return out


def push_row_grads(ps: Any, grads: RowGrads, scale: float = 1.0) -> int:
    """Push `row_grads` output (times `scale`) to the PS; returns the number of rows pushed."""
    n = 0
    for table, (ids, g) in grads.items():
        if len(ids) == 0:
            continue
        ps.push(table, ids, g * scale if scale != 1.0 else g)
        n += len(ids)
    return n


def push_grads(ps: Any, rows: dict[str, Rows], scale: float = 1.0) -> int:
    """Push each table's row gradients (times `scale`) to the PS, leaving out rows the loss did not
    reach (`row_grads`); returns the number of rows pushed."""
    return push_row_grads(ps, row_grads(rows), scale)


def prefetch_rows(ps: Any, ids_by_table: dict[str, Tensor | np.ndarray]) -> None:
    """Start pulling the next batch's rows now (overlaps with this batch's compute when the PS allows)."""
    for table, ids in ids_by_table.items():
        uniq = unique_ids(ids)
        routed = _routed(ps, uniq)
        ps.prefetch(table, uniq if routed is None else routed)


class SparseModel(Protocol):
    """The methods a model offers the engine (see the module docstring)."""

    def sparse_tables(self) -> list: ...

    def make_batch(self, rows: Any, rng: np.random.Generator) -> dict[str, Tensor]: ...

    def sparse_ids(self, batch: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def __call__(self, batch: dict[str, Tensor], emb: dict[str, Rows]) -> Tensor: ...

    def scorer(self, rows: Any, pull: Pull) -> Any: ...



@runtime_checkable
class Exports(Protocol):
    """The optional `export` hook of a SparseModel (see the module docstring): a model offers it
    when `isinstance(model, Exports)`."""

    def export(self, pull: Pull, users: Any = None) -> dict[str, Any]: ...


@runtime_checkable
class ExportsParts(Protocol):
    """The chunked export hooks (see the module docstring): the refresh job computes every table
    of such a model in parallel chunks; others get `export` called once per table."""

    def export_keys(self) -> dict[str, Any]: ...

    def export_part(self, name: str, rows: Any, pull: Pull) -> Any: ...


def export_from_parts(model: ExportsParts, pull: Pull, users: Any = None) -> dict[str, Any]:
    """`export` of a model with the chunked hooks: every catalogue table whole, and "user" for `users`."""
    out = {name: model.export_part(name, keys, pull) for name, keys in model.export_keys().items()}
    if users is not None:
        out["user"] = model.export_part("user", users, pull)
    return out
