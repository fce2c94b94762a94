"""The dense side of a training program: named optimizers over parameter groups, their schedules,
and the gradient all-reduce that replaces DDP.

Why not DDP: a program steps one optimizer at a time over a subset of the parameters (a frozen
critic gets gradients it must not use), and a WGAN gradient penalty back-propagates through
`torch.autograd.grad(create_graph=True)`, which DDP does not support. The engine instead
all-reduces, once per iteration, the gradients of exactly the optimizer being stepped, as one
flat buffer, and divides by the world size: the same average DDP computes (for 2 workers
bit-identical: halving is exact in floating point). Parameters start equal on every worker
(same seed, and rank 0's weights are broadcast after any restore).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from xdtrain.nn.program import OptimSpec


def group_params(model: nn.Module, specs: dict[str, OptimSpec]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each optimizer's (name, parameter) list: a parameter goes to the optimizer with the longest
    matching prefix (to each of them when optimizers of different phases declare the same prefix),
    and also to every `shared` optimizer a prefix of which matches it. A parameter no optimizer
    claims is never stepped (it stays as initialised)."""
    groups: dict[str, list] = {k: [] for k in specs}
    for name, param in model.named_parameters():
        best = {k: max((len(p) for p in s.params if name.startswith(p)), default=-1)
                for k, s in specs.items() if not s.shared}
        top = max(best.values(), default=-1)
        for k, n in best.items():
            if top >= 0 and n == top:
                groups[k].append((name, param))
        for k, s in specs.items():
            if s.shared and any(name.startswith(p) for p in s.params):
                groups[k].append((name, param))
    return groups


def schedule_factor(spec: OptimSpec, step: int) -> float:
    """The lr multiplier after `step` optimizer steps (step 0 is the first update)."""
    t = step + 1
    w = spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "warmup":
        return min(1.0, t / w) if w > 0 else 1.0
    if spec.schedule == "linear":
        if w > 0 and t <= w:
            return t / w
        return max(0.0, (spec.total_steps - t) / max(1, spec.total_steps - w))
    # noam (Vaswani et al. 2017, eq. 3): d^-0.5 * min(t^-0.5, t * w^-1.5), times lr
    return spec.noam_d ** -0.5 * min(t ** -0.5, t * w ** -1.5)


def build_optimizer(spec: OptimSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.kind == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)


class DenseOptimizer:
    """One named optimizer: torch optimizer + LambdaLR schedule + clipping + gradient all-reduce."""

    def __init__(self, name: str, spec: OptimSpec, named_params: list[tuple[str, nn.Parameter]]) -> None:
        self.name, self.spec = name, spec
        self.param_names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        # torch refuses an empty parameter list; a PS-only optimizer (tables, no dense params) still steps
        self.opt = build_optimizer(spec, self.params or [nn.Parameter(torch.zeros(1))])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: schedule_factor(spec, s))

    def all_reduce_grads(self, world: int) -> None:
        """Average this optimizer's gradients over the workers (missing gradients count as zero)."""
        if world <= 1 or not self.params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.div_(world)
        dist.all_reduce(flat)
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n

    def step(self, world: int) -> float:
        """All-reduce, clip, step, advance the schedule; returns the pre-clip grad norm (0 if unclipped)."""
        self.all_reduce_grads(world)
        norm = 0.0
        if self.spec.clip > 0 and self.params:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip))
        self.opt.step()
        self.sched.step()
        return norm

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "schedule": {"last_epoch": self.sched.last_epoch},
                "params": self.param_names}

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" in state:  # a checkpoint of the single-optimizer engine
            state = {"optimizer": state, "schedule": {"last_epoch": 0}, "params": self.param_names}
        if state.get("params", self.param_names) != self.param_names:
            raise ValueError(f"optimizer {self.name!r}: the checkpoint steps other parameters than this model "
                             f"({len(state['params'])} vs {len(self.param_names)})")
        self.opt.load_state_dict(state["optimizer"])  # its param groups carry the scheduled lr
        self.sched.last_epoch = int(state["schedule"]["last_epoch"])


class OptimizerSet(dict):
    """Every named optimizer of a program; checkpointed together in one file."""

    def __init__(self, model: nn.Module, specs: dict[str, OptimSpec]) -> None:
        groups = group_params(model, specs)
        super().__init__({k: DenseOptimizer(k, specs[k], groups[k]) for k in specs})

    def zero_grad(self) -> None:
        """Every optimizer's gradients: a step never sees gradients left by another optimizer's step."""
        for o in self.values():
            o.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["optimizers"] if "optimizers" in state else {next(iter(self)): state}  # single-Adam engine
        unknown = sorted(set(saved) - set(self))
        if unknown:
            raise ValueError(f"checkpoint has optimizers {unknown} that this program does not declare")
        for k, o in self.items():
            if k in saved:  # an optimizer new in this program starts fresh
                o.load_state_dict(saved[k])


def broadcast_dense(model: nn.Module, world: int) -> None:
    """Rank 0's parameters and buffers to every worker (what DDP did when it wrapped the model)."""
    if world <= 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
