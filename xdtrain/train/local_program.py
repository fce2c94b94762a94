"""A training program in one process (world 1, an in-process PS): what a worker of the engine does
per iteration, without Ray, for unit tests and CPU-sized experiments (scripts/, tests).

    ps = local_ps(model)                                    # the model's tables, in process
    named = local_iteration(model, ps, opts, step, batch)   # forward, backward, step, push
    run_epochs(model, ps, prog, tables, rng, after_epoch)   # the phases of an epoch-counted program
    run_iterations(model, ps, opts, prog, phase, tables, rng)  # one iteration-counted phase

Not the engine: no streaming reader, checkpoints or prefetch. A phase's `ps_lr_scale` is applied
at its start, as the engine's worker does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from xdtrain.nn.program import Phase, Program, Step
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS
from xdtrain.train.optimizers import OptimizerSet
from xdtrain.train.streams import accepts
from xdtrain.train.worker import pick_loss


def local_ps(model: torch.nn.Module) -> LocalPS:
    """An in-process PS (one shard) holding the model's sparse tables."""
    ps = LocalPS(1)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    return ps


def set_phase_lr_scales(ps, phase: Phase) -> None:
    """The phase's PS learning-rate scales; 1 for the tables it does not name (an earlier phase's
    scale does not carry over)."""
    for table in ps.tables():
        ps.set_lr_scale(table, float(phase.ps_lr_scale.get(table, 1.0)))


def run_iterations(model: torch.nn.Module, ps, opts: OptimizerSet, prog: Program, phase: Phase,
                   tables: dict[str, pa.Table], rng: np.random.Generator) -> dict:
    """An iteration-counted phase: its steps in order, each `repeat` times, until `phase.iterations`
    iterations; each stream's batch drawn at random (no row twice in a batch). Returns the last
    iteration's named losses."""
    set_phase_lr_scales(ps, phase)
    model.train()
    it, named = 0, {}
    while it < phase.iterations:
        for st in phase.steps:
            for _ in range(st.repeat):
                b = {s: random_batch(model, prog, tables, rng, s) for s in st.streams}
                named = local_iteration(model, ps, opts, st, b if len(b) > 1 else next(iter(b.values())))
                it += 1
    return named


def random_batch(model: torch.nn.Module, prog: Program, tables: dict[str, pa.Table], rng: np.random.Generator,
                 stream: str) -> dict:
    """A batch of `stream` drawn at random from its dataset (no row twice)."""
    t, size = tables[prog.streams[stream].dataset], prog.streams[stream].batch_size
    return make_batch(model, t.take(rng.choice(t.num_rows, min(t.num_rows, size), replace=False)), rng, stream)


@functools.cache
def _takes(cls: type, method: str, keyword: str) -> bool:
    """Whether `cls.method` takes `keyword` (asked once per model class, not per iteration)."""
    return accepts(getattr(cls, method), keyword)


def make_batch(model: torch.nn.Module, rows: pa.Table, rng: np.random.Generator, stream: str) -> dict:
    """`model.make_batch`, told the stream when it takes one (as the engine's readers do)."""
    if _takes(type(model), "make_batch", "stream"):
        return model.make_batch(rows, rng, stream=stream)
    return model.make_batch(rows, rng)


def local_iteration(model: torch.nn.Module, ps, opts: OptimizerSet, step: Step, batch: dict) -> dict:
    """One iteration of `step`: pull, forward, backward, step its optimizer, push its tables' rows.
    Returns the named losses (detached floats)."""
    emb = pull_rows(ps, model.sparse_ids(batch))
    out = model(batch, emb, step=step.label) if _takes(type(model), "forward", "step") else model(batch, emb)
    loss, named = pick_loss(out, step)
    opts.zero_grad()
    loss.backward()
    opt = opts[step.optimizer]
    push_grads(ps, {k: v for k, v in emb.items() if opt.spec.tables is None or k in opt.spec.tables})
    opt.step(world=1)
    return {k: float(v) for k, v in named.items()} or {"loss": float(loss)}


class _Cursor:
    """Shuffled batches of one stream's rows; `cycle` reshuffles and restarts when exhausted.
    `groups` (a key per row, e.g. a time period): rows of a group stay together (the groups in a
    random order, the rows within each shuffled), as in a log read in time order."""

    def __init__(self, table: pa.Table, batch_size: int, rng: np.random.Generator,
                 groups: np.ndarray | None = None) -> None:
        self.table, self.size, self.rng, self.groups = table, batch_size, rng, groups
        self.reshuffle()

    def reshuffle(self) -> None:
        self.pos = 0
        if self.groups is None:
            self.order = self.rng.permutation(self.table.num_rows)
            return
        keys = np.unique(self.groups)
        self.order = np.concatenate([self.rng.permutation(np.flatnonzero(self.groups == k))
                                     for k in self.rng.permutation(keys)])

    def next(self) -> pa.Table | None:
        if self.pos >= len(self.order):
            return None
        idx = self.order[self.pos:self.pos + self.size]
        self.pos += self.size
        return self.table.take(idx)

    def next_cycling(self) -> pa.Table:
        out = self.next()
        if out is None:
            self.reshuffle()
            out = self.next()
        return out


def run_epochs(model: torch.nn.Module, ps, prog: Program, tables: dict[str, pa.Table], rng: np.random.Generator,
               after_epoch: Callable[[str, int], None] | None = None,
               on_iteration: Callable[[Step, int, float], None] | None = None,
               groups: dict[str, np.ndarray] | None = None) -> dict:
    """Train `prog` (phases whose steps count epochs, or one pass per phase epoch): each phase epoch,
    each step passes `step.epochs` (at least 1) times over its main stream's dataset, a cycling
    stream's batch drawn alongside each. `tables`: dataset name -> rows. `after_epoch(phase, epoch)`
    runs after each phase epoch (evaluation); `on_iteration(step, rows, seconds)` after each iteration
    (throughput); `groups`: dataset name -> a key per row whose rows are batched together (`_Cursor`).
    Returns the last iteration's named losses."""
    opts = OptimizerSet(model, prog.optimizers)
    cursors = {name: _Cursor(tables[s.dataset], s.batch_size, rng, (groups or {}).get(s.dataset))
               for name, s in prog.streams.items()}
    named: dict = {}
    for ph in prog.phases:
        if ph.iterations:
            raise ValueError(f"run_epochs: phase {ph.name!r} counts iterations; run_iterations runs it")
        set_phase_lr_scales(ps, ph)
        for epoch in range(ph.epochs):
            for st in ph.steps:
                main = prog.main_stream(st)
                for _ in range(max(1, st.epochs)):
                    cur = cursors[main]
                    cur.reshuffle()
                    while (rows := cur.next()) is not None:
                        t0 = time.perf_counter()
                        b = {s: make_batch(model, rows if s == main else cursors[s].next_cycling(), rng, s)
                             for s in st.streams}
                        model.train()
                        named = local_iteration(model, ps, opts, st, b if len(b) > 1 else b[main])
                        if on_iteration is not None:
                            on_iteration(st, rows.num_rows, time.perf_counter() - t0)
            if after_epoch is not None:
                after_epoch(ph.name, epoch)
    return named
