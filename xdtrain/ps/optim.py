"""Row-wise sparse optimizers that run on the shard.

Each optimizer declares its per-row state (name -> width, dtype, initial value) and updates
only the rows it is handed, vectorised over the batch. The formulas follow torch's own:

* ``sgd``:             w -= lr * g                                    (torch.optim.SGD)
* ``adagrad``:         s += g*g;  w -= lr * g / (sqrt(s) + eps)       (torch.optim.Adagrad)
* ``rowwise_adagrad``: a += mean(g*g);  w -= lr * g / (sqrt(a) + eps)  (FBGEMM/TorchRec exact row-wise)
* ``adam`` (lazy):     per-row step t; m += (g - m)(1 - b1); v += (g*g - v)(1 - b2);
                       w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
                       (torch.optim.SparseAdam's update, with the step counted per row, so a row
                       untouched for a while is bias-corrected as if it had its own optimizer)

All math is float32; rows stored as float16 are widened for the update and narrowed after.
`lr_scale` (a table's per-phase scale, `Router.set_lr_scale`) multiplies lr in float64 before the
update, exactly as a torch optimizer built with lr = lr * scale computes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
_CHUNK_ELEMS = 1 << 18  # rows per chunk = this / dim: ~1 MB float32 buffers
_DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "rowwise_adagrad": 1e-8, "adam": 1e-8}


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer a table uses and its hyper-parameters (eps=None: the optimizer's torch default)."""

    name: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name: unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr: must be > 0, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"optimizer.beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")

    @property
    def resolved_eps(self) -> float:
        return _DEFAULT_EPS[self.name] if self.eps is None else float(self.eps)

    def to_dict(self) -> dict:
        return asdict(self)


# State layout: name -> (width, dtype, initial value); width 0 means one scalar per row.
StateLayout = dict[str, tuple[int, str, float]]


def state_layout(spec: OptimizerSpec, dim: int) -> StateLayout:
    """Per-row optimizer state of `spec` for rows of width `dim`."""
    acc0 = float(spec.initial_accumulator_value)
    if spec.name == "sgd":
        return {}
    if spec.name == "rowwise_adagrad":
        return {"acc": (0, "float32", acc0)}
    if spec.name == "adagrad":
        return {"sum": (dim, "float32", acc0)}
    return {"m": (dim, "float32", 0.0), "v": (dim, "float32", 0.0), "step": (0, "int32", 0)}


def state_bytes_per_row(spec: OptimizerSpec, dim: int) -> int:
    return sum(max(w, 1) * np.dtype(dt).itemsize for w, dt, _ in state_layout(spec, dim).values())


def apply_update(
    spec: OptimizerSpec,
    rows: np.ndarray,
    state: dict[str, np.ndarray],
    pos: np.ndarray,
    grads: np.ndarray,
    lr_scale: float = 1.0,
) -> None:
    """Update rows[pos] (and their state) in place with `grads` (one distinct position per grad row),
    with learning rate spec.lr * lr_scale.

    Works in chunks of rows with reused buffers: the working set stays in cache and no large
    temporaries are allocated (fresh pages are expensive on VMs).
    """
    n = len(pos)
    if n == 0:
        return
    g_all = np.asarray(grads, dtype=np.float32)
    dim = g_all.shape[1]
    chunk = max(1, min(n, _CHUNK_ELEMS // dim))
    lr = float(spec.lr) * float(lr_scale)
    bufs = [np.empty((chunk, dim), dtype=np.float32) for _ in range(3)]
    for start in range(0, n, chunk):
        p, g = pos[start : start + chunk], g_all[start : start + chunk]
        w, t, u = (b[: len(p)] for b in bufs)
        if rows.dtype == np.float32:
            np.take(rows, p, axis=0, out=w, mode="clip")  # "raise" would copy through a temporary
        else:
            w[...] = rows[p]
        _step(spec, lr, w, t, u, state, p, g)
        rows[p] = w


def _step(
    spec: OptimizerSpec,
    lr_f64: float,
    w: np.ndarray,
    t: np.ndarray,
    u: np.ndarray,
    state: dict[str, np.ndarray],
    p: np.ndarray,
    g: np.ndarray,
) -> None:
    """One chunk: w (the rows, float32) is updated in place; t and u are scratch of w's shape."""
    lr = np.float32(lr_f64)
    eps = np.float32(spec.resolved_eps)
    if spec.name == "sgd":
        np.multiply(g, lr, out=t)
    elif spec.name == "rowwise_adagrad":
        acc = state["acc"]
        a = acc[p] + np.einsum("ij,ij->i", g, g) / np.float32(g.shape[1])
        acc[p] = a
        np.multiply(g, (lr / (np.sqrt(a) + eps))[:, None], out=t)
    elif spec.name == "adagrad":
        s = state["sum"]
        np.take(s, p, axis=0, out=u, mode="clip")
        np.multiply(g, g, out=t)
        u += t
        s[p] = u
        np.sqrt(u, out=t)
        t += eps
        np.divide(g, t, out=t)
        t *= lr
    else:
        _adam(spec, lr_f64, t, u, state, p, g, eps)
    w -= t


def _adam(
    spec: OptimizerSpec,
    lr: float,
    t: np.ndarray,
    u: np.ndarray,
    state: dict[str, np.ndarray],
    p: np.ndarray,
    g: np.ndarray,
    eps: np.float32,
) -> None:
    """Leaves the update in t; uses u as scratch."""
    b1, b2 = spec.beta1, spec.beta2
    steps = state["step"][p] + 1
    state["step"][p] = steps
    m = state["m"][p]
    np.subtract(g, m, out=t)
    t *= np.float32(1.0 - b1)
    m += t
    state["m"][p] = m
    v = state["v"][p]
    np.multiply(g, g, out=t)
    t -= v
    t *= np.float32(1.0 - b2)
    v += t
    state["v"][p] = v
    tf = steps.astype(np.float64)
    # step size in float64 then float32, as torch computes it in Python floats
    step_size = (lr * np.sqrt(1.0 - b2**tf) / (1.0 - b1**tf)).astype(np.float32)
    np.sqrt(v, out=u)
    u += eps
    np.divide(m, u, out=t)
    t *= step_size[:, None]


def check_lr_scale(table: str, scale: float) -> float:
    """`scale` as a float, or ValueError naming the table: finite and >= 0 (0 holds the rows still,
    though an adaptive optimizer's state still counts the gradients)."""
    s = float(scale)
    if not np.isfinite(s) or s < 0:
        raise ValueError(f"table {table!r}: lr scale must be a finite number >= 0, got {scale!r}")
    return s
