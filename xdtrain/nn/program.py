"""Training programs: what a model may declare so that the one engine loop runs it.

Every hook is optional; a model without them gets today's program, one stream, one Adam, one phase:

    def streams(self) -> dict[str, StreamSpec]     # default {"train": StreamSpec()}
    def optimizers(self) -> dict[str, OptimSpec]   # default {"main": OptimSpec()} (all params, all tables)
    def plan(self) -> list[Phase]                  # default [Phase("train")] (train.epochs epochs)
    def forward(self, batch, emb, step="") -> Tensor | dict[str, Tensor]

The engine runs phases in order. A phase repeats its steps, in order, as rounds; a step is
`repeat` iterations (or, with `epochs > 0`, as many as it takes its main stream to run that many
epochs). One iteration draws one batch from each of the step's streams, pulls the rows their ids
touch, runs `forward(batch, emb, step=<step name>)`, back-propagates the step's loss, all-reduces
the gradients of the step's optimizer over the workers, clips, steps it, and pushes the row
gradients of that optimizer's PS tables. Parameters and tables of other optimizers are not
touched: a frozen critic stays bit-identical.

A phase "epoch" is one round when some step counts epochs, else one pass of the phase's main
stream (the first step's non-cycling stream). Validation, checkpoints and early stopping run at
phase epochs; a phase ends after `epochs` of them, `iterations` iterations, or a plateau of
`patience` validations without improvement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_STREAM = "train"
DEFAULT_OPTIMIZER = "main"
SAMPLERS = ("", "domain_balanced")  # "": the shuffled reader; see xdtrain.data.sampler
FROM_CONFIG = None  # a field left at None takes the job config's value (train.lr, train.batch_size, ...)


@dataclass(frozen=True)
class StreamSpec:
    """One named input stream: its own reader, cursor, batch size and epoch count."""

    dataset: str = DEFAULT_STREAM  # the prepared dataset it reads (a data recipe's output name)
    batch_size: int | None = FROM_CONFIG  # global rows per iteration, split over the workers
    drop_last: bool = False  # a worker skips its last short batch
    cycle: bool = False  # restart when exhausted (the smaller domain repeats while the larger runs)
    sampler: Literal["", "domain_balanced"] = ""  # domain_balanced: every domain equally likely per draw,
    # rows drawn with replacement (xdtrain.data.sampler; the dataset needs a `domain` column)
    seed: int = 0  # added to train.seed for this stream's shuffle (two streams over one dataset differ)


@dataclass(frozen=True)
class OptimSpec:
    """One named dense optimizer over a parameter group, and the PS tables it steps."""

    params: tuple[str, ...] = ("",)  # parameter-name prefixes ("" = every parameter)
    tables: tuple[str, ...] | None = None  # PS tables pushed when it steps (None = every pulled table)
    kind: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float | None = FROM_CONFIG
    betas: tuple[float, float] | None = FROM_CONFIG
    weight_decay: float | None = FROM_CONFIG
    momentum: float = 0.0  # sgd
    schedule: Literal["constant", "warmup", "linear", "noam"] = "constant"
    warmup_steps: int = 0
    total_steps: int = 0  # linear: reaches 0 at this step
    noam_d: int = 0  # noam: lr * d^-0.5 * min(t^-0.5, t * warmup^-1.5) (Vaswani et al. 2017, eq. 3)
    clip: float = 0.0  # max global grad norm of its parameters (0 = no clipping)
    # True: a second optimizer over parameters another one owns (AMID's slow stage-2 Adam over θ):
    # it steps every parameter its prefixes match and takes no part in the longest-prefix ownership.
    shared: bool = False


@dataclass(frozen=True)
class Step:
    """`repeat` iterations (or `epochs` epochs of its main stream) with one optimizer."""

    optimizer: str = DEFAULT_OPTIMIZER
    streams: tuple[str, ...] = (DEFAULT_STREAM,)
    repeat: int = 1
    epochs: int = 0
    name: str = ""  # passed to forward(step=...); "" = the optimizer's name
    loss: str = ""  # the named loss to back-propagate ("" = "loss" if returned, else the sum)

    @property
    def label(self) -> str:
        return self.name or self.optimizer


@dataclass(frozen=True)
class Phase:
    name: str = "train"
    steps: tuple[Step, ...] = (Step(),)
    epochs: int | None = FROM_CONFIG  # phase epochs (None = train.epochs)
    iterations: int = 0  # end after this many iterations (0 = no limit)
    patience: int | None = FROM_CONFIG  # end on a plateau of this many validations (None = train.patience)
    ps_lr_scale: dict[str, float] = field(default_factory=dict)  # table -> lr multiplier in this phase
    frozen_tables: tuple[str, ...] = ()  # tables never pushed in this phase


@dataclass(frozen=True)
class Program:
    """A model's whole program, with every FROM_CONFIG value resolved."""

    streams: dict[str, StreamSpec]
    optimizers: dict[str, OptimSpec]
    phases: list[Phase]

    def main_stream(self, step: Step) -> str | None:
        """The step's one non-cycling stream (None when all cycle)."""
        main = [s for s in step.streams if not self.streams[s].cycle]
        return main[0] if main else None


def _check(prog: Program) -> None:
    if not prog.phases:
        raise ValueError("plan(): at least one phase")
    owners: dict[str, list[str]] = {}
    for name, o in prog.optimizers.items():
        if o.kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizers()[{name!r}].kind: {o.kind!r}; expected adam, adamw or sgd")
        if o.schedule not in ("constant", "warmup", "linear", "noam"):
            raise ValueError(f"optimizers()[{name!r}].schedule: unknown {o.schedule!r}")
        if o.schedule == "linear" and o.total_steps <= o.warmup_steps:
            raise ValueError(f"optimizers()[{name!r}]: a linear schedule needs total_steps > warmup_steps")
        if o.schedule == "noam" and (o.noam_d <= 0 or o.warmup_steps <= 0):
            raise ValueError(f"optimizers()[{name!r}]: noam needs noam_d > 0 and warmup_steps > 0")
        for p in () if o.shared else o.params:
            owners.setdefault(p, []).append(name)
    # Optimizers of different phases may share parameters (a pre-training and an adversarial Adam
    # over one encoder); two optimizers of one phase may not, so a frozen side stays frozen
    # (except a `shared` one, which declares that it steps another's parameters on purpose).
    for ph in prog.phases:
        used = {st.optimizer for st in ph.steps}
        for p, names in owners.items():
            both = [n for n in names if n in used]
            if len(both) > 1:
                raise ValueError(f"optimizers(): prefix {p!r} belongs to both {both[0]!r} and {both[1]!r}, "
                                 f"which phase {ph.name!r} both uses")
    for name, s in prog.streams.items():
        if s.batch_size is not None and s.batch_size < 1:
            raise ValueError(f"streams()[{name!r}].batch_size must be >= 1, got {s.batch_size}")
        if s.sampler not in SAMPLERS:
            raise ValueError(f"streams()[{name!r}].sampler: unknown {s.sampler!r}; expected one of {SAMPLERS}")
    for ph in prog.phases:
        if not ph.steps:
            raise ValueError(f"phase {ph.name!r}: no steps")
        if ph.epochs < 0 or ph.iterations < 0 or not (ph.epochs or ph.iterations):
            raise ValueError(f"phase {ph.name!r}: epochs and iterations must be >= 0, one of them > 0")
        for st in ph.steps:
            where = f"phase {ph.name!r} step {st.label!r}"
            if st.optimizer not in prog.optimizers:
                raise ValueError(f"{where}: unknown optimizer {st.optimizer!r}; have {sorted(prog.optimizers)}")
            unknown = [s for s in st.streams if s not in prog.streams]
            if unknown or not st.streams:
                raise ValueError(f"{where}: unknown streams {unknown}; have {sorted(prog.streams)}")
            if sum(not prog.streams[s].cycle for s in st.streams) > 1:
                raise ValueError(f"{where}: at most one non-cycling stream per step (its main stream)")
            if st.repeat < 1 or st.epochs < 0:
                raise ValueError(f"{where}: repeat must be >= 1 and epochs >= 0")
            if st.epochs and prog.main_stream(st) is None:
                raise ValueError(f"{where}: counts epochs but all its streams cycle")
        if ph.epochs and prog.main_stream(ph.steps[0]) is None and not counts_rounds(ph):
            raise ValueError(f"phase {ph.name!r}: its first step's streams all cycle, so it has no epochs; "
                             "set epochs=0 and iterations > 0")


def counts_rounds(ph: Phase) -> bool:
    """A phase epoch is a round (some step counts epochs) rather than a pass of the main stream."""
    return any(st.epochs for st in ph.steps)


def resolve_program(model: object, *, batch_size: int, epochs: int, patience: int, lr: float,
                    betas: tuple[float, float], weight_decay: float) -> Program:
    """The model's program with the job config's values filled in, checked."""
    streams = dict(model.streams()) if hasattr(model, "streams") else {DEFAULT_STREAM: StreamSpec()}
    optims = dict(model.optimizers()) if hasattr(model, "optimizers") else {DEFAULT_OPTIMIZER: OptimSpec()}
    phases = list(model.plan()) if hasattr(model, "plan") else [Phase()]
    streams = {k: _fill(s, batch_size=batch_size) for k, s in streams.items()}
    optims = {k: _fill(o, lr=lr, betas=tuple(betas), weight_decay=weight_decay) for k, o in optims.items()}
    phases = [_fill(p, epochs=epochs, patience=patience) for p in phases]
    prog = Program(streams, optims, phases)
    _check(prog)
    return prog


def _fill(spec, **defaults):
    from dataclasses import replace

    return replace(spec, **{k: v for k, v in defaults.items() if getattr(spec, k) is None})
