"""A training program's iteration in one process (world 1, an in-process PS): what a worker of the
engine does per iteration, without Ray, for unit tests and CPU-sized experiments (scripts/).

    named = local_iteration(model, ps, opts, step, batch)   # forward, backward, step, push

Not the engine: no streams, checkpoints, prefetch or phase `ps_lr_scale`; the caller draws the
batches (the step's streams) and walks the plan.
"""

from __future__ import annotations

import torch

from xdtrain.nn.program import Step
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.train.optimizers import OptimizerSet
from xdtrain.train.worker import pick_loss


def local_iteration(model: torch.nn.Module, ps, opts: OptimizerSet, step: Step, batch: dict) -> dict:
    """One iteration of `step`: pull, forward, backward, step its optimizer, push its tables' rows.
    Returns the named losses (detached floats)."""
    emb = pull_rows(ps, model.sparse_ids(batch))
    loss, named = pick_loss(model(batch, emb, step=step.label), step)
    opts.zero_grad()
    loss.backward()
    opt = opts[step.optimizer]
    push_grads(ps, {k: v for k, v in emb.items() if opt.spec.tables is None or k in opt.spec.tables})
    opt.step(world=1)
    return {k: float(v) for k, v in named.items()} or {"loss": float(loss)}
