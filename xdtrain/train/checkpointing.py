"""Engine checkpoints: one directory per checkpoint, consistent at one step.

    checkpoint_00000420/
      engine.json          step, epoch, world size, best validation so far, PS location   (rank 0)
      dense.safetensors    the model's dense state_dict                                   (rank 0)
      optimizer.pt         the dense optimizer's state (tensors only: loaded weights_only)  (rank 0)
      optimizer-params.json  the names of its parameters, by group (kept state across a new model)
      cursor-rank{r}.json  each worker's streaming-reader cursor                          (every rank)
      ps/                  every PS shard: rows, optimizer state, id map; manifest last     (the shards)

Ray Train merges the workers' files into the run's `checkpoint_*` directory and registers it only
after every worker reported, so a crash mid-write leaves the previous checkpoint as the latest.
The PS shards write `ps/` straight to that directory (they may live on other nodes), before the
workers report, with their own manifest written last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xdtrain.config import ConfigError
from xdtrain.jobrunner import write_json_atomic

ENGINE_FILE = "engine.json"
DENSE_FILE = "dense.safetensors"
OPTIM_FILE = "optimizer.pt"
PS_DIR = "ps"


def checkpoint_name(step: int, attempt: int = 0) -> str:
    """Unique per worker-group attempt: a step redone after a restart never reuses a directory that
    Ray Train registered (or deleted) before. Sorted by name = sorted by (step, attempt)."""
    return f"checkpoint_{step:09d}_a{attempt:03d}"


def cursor_file(rank: int) -> str:
    return f"cursor-rank{rank}.json"


@dataclass
class EngineState:
    """Where training stands; saved in engine.json."""

    step: int = 0  # optimizer steps taken (global: every worker steps together)
    epoch: int = 0  # the epoch in progress (or the next one, when `epoch_done`)
    epoch_done: bool = False
    world_size: int = 1
    samples: int = 0  # training rows consumed, all workers
    best_score: float = float("-inf")
    best_step: int = -1
    best_dir: str = ""  # checkpoint directory name of the best validation
    best_metrics: dict = field(default_factory=dict)
    bad_validations: int = 0
    finished: bool = False
    stop_reason: str = ""
    validations: list = field(default_factory=list)  # [{"step", "epoch", metric: value}]
    ps_url: str = ""  # where this checkpoint's PS shards were written

    def to_json(self) -> str:
        d = asdict(self)
        d["best_score"] = None if d["best_score"] == float("-inf") else d["best_score"]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> EngineState:
        d = json.loads(text)
        d["best_score"] = float("-inf") if d.get("best_score") is None else d["best_score"]
        return cls(**d)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_rank0(directory: str | Path, state: EngineState, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / f".{DENSE_FILE}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, d / DENSE_FILE)
    save_optimizer(d, optimizer, model)
    _atomic_write(d / ENGINE_FILE, state.to_json().encode())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The model's name of every parameter the optimizer holds, by param group."""
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    out = []
    for g in optimizer.param_groups:
        missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer holds parameters of shapes {missing[:3]} that are not the model's")
        out.append([names[id(p)] for p in g["params"]])
    return out


def _names_file(file: str) -> str:
    return f"{Path(file).stem}-params.json"


def save_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   file: str = OPTIM_FILE) -> None:
    """The optimizer's state as `file`, with its parameters' names beside it (so a transfer to a
    model with more or fewer modules can keep the state of the parameters both have)."""
    d = Path(directory)
    tmp = d / f".{file}.tmp"
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, d / file)
    _atomic_write(d / _names_file(file), json.dumps(param_names(optimizer, model)).encode())


def save_cursor(directory: str | Path, rank: int, cursor: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / cursor_file(rank), json.dumps(cursor).encode())


def load_state(directory: str | Path) -> EngineState:
    path = Path(directory) / ENGINE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not an xdtrain checkpoint (no {ENGINE_FILE})")
    return EngineState.from_json(path.read_text())


def load_dense(directory: str | Path, model: torch.nn.Module) -> None:
    """The dense weights (safetensors: no pickle); every key must match the model (resume)."""
    model.load_state_dict(load_file(str(Path(directory) / DENSE_FILE)))


def load_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer, file: str = OPTIM_FILE) -> None:
    """The optimizer's whole state (resume: the same model and parameter groups)."""
    optimizer.load_state_dict(torch.load(Path(directory) / file, weights_only=True))


@dataclass
class TransferReport:
    """What a partial restore did, by key (dense state entry, parameter, or PS table): `loaded` from
    the checkpoint; `new`: the model's, not in the checkpoint (left at their init); `dropped`: the
    checkpoint's, not in the model; `imported`: PS tables filled from Parquet."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        def few(keys: list[str]) -> str:
            return f" {keys[:4]}{' ...' if len(keys) > 4 else ''}" if keys else ""

        parts = [f"{len(self.loaded)} loaded", f"{len(self.new)} new{few(self.new)}",
                 f"{len(self.dropped)} dropped{few(self.dropped)}"]
        if self.imported:
            parts.append(f"{len(self.imported)} imported{few(self.imported)}")
        return f"{what}: " + ", ".join(parts)


def load_dense_partial(directory: str | Path, model: torch.nn.Module) -> TransferReport:
    """Transfer: load every dense entry the checkpoint and the model both have; the model's other
    entries (new heads) keep their init. ConfigError, naming the key and both shapes, when a
    shared entry changed shape."""
    path = Path(directory) / DENSE_FILE
    saved = load_file(str(path))
    own = model.state_dict()
    shared = [k for k in own if k in saved]
    for k in shared:
        if tuple(saved[k].shape) != tuple(own[k].shape):
            raise ConfigError(f"{path}: dense key {k!r} has shape {tuple(saved[k].shape)} in the checkpoint, "
                              f"{tuple(own[k].shape)} in the model")
    model.load_state_dict({k: saved[k] for k in shared}, strict=False)
    return TransferReport(loaded=shared, new=[k for k in own if k not in saved],
                          dropped=[k for k in saved if k not in own])


def load_optimizer_partial(directory: str | Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                           file: str = OPTIM_FILE) -> TransferReport:
    """Transfer with kept optimizer state: each of the optimizer's parameters takes the saved state
    of the parameter of the same name (new parameters start fresh); its hyper-parameters (lr,
    betas, weight decay) stay the current ones. A checkpoint without the names file is matched by
    position, only when its parameter groups have the same sizes."""
    path = Path(directory) / file
    saved = torch.load(path, weights_only=True)
    names = param_names(optimizer, model)
    names_path = path.with_name(_names_file(file))
    if names_path.exists():
        saved_names = json.loads(names_path.read_text())
    elif [len(g["params"]) for g in saved["param_groups"]] == [len(n) for n in names]:
        saved_names = names
    else:
        raise ConfigError(f"{path}: cannot keep its optimizer state for this model: no {names_path.name} to "
                          "match parameters by name, and the parameter groups differ (use fresh)")
    by_name = {n: saved["state"][i] for g, ns in zip(saved["param_groups"], saved_names)
               for i, n in zip(g["params"], ns) if i in saved["state"]}
    current = optimizer.state_dict()
    state, report = {}, TransferReport()
    for group, cur, ns in zip(optimizer.param_groups, current["param_groups"], names):
        for p, i, n in zip(group["params"], cur["params"], ns):
            if n not in by_name:
                report.new.append(n)
                continue
            for key, v in by_name[n].items():
                if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    raise ConfigError(f"{path}: optimizer state {key!r} of {n!r} has shape {tuple(v.shape)}, "
                                      f"the parameter {tuple(p.shape)}")
            state[i] = by_name[n]
            report.loaded.append(n)
    report.dropped = [n for n in by_name if n not in set(report.loaded)]
    current["state"] = state
    optimizer.load_state_dict(current)
    return report


def load_cursors(directory: str | Path, world_size: int) -> list[dict]:
    """Every old rank's reader cursor, in rank order."""
    out = []
    for r in range(world_size):
        path = Path(directory) / cursor_file(r)
        if not path.exists():
            raise FileNotFoundError(f"{directory}: missing {cursor_file(r)} (checkpoint of {world_size} workers)")
        out.append(json.loads(path.read_text()))
    return out


def ps_url(directory: str | Path) -> str:
    return str(Path(directory) / PS_DIR)


def latest_checkpoint(run_storage: str | Path) -> Path | None:
    """The newest complete checkpoint directory under a run's storage (by step), or None."""
    root = Path(run_storage)
    if not root.exists():
        return None
    done = [p for p in root.glob("checkpoint_*") if (p / ENGINE_FILE).exists() and (p / PS_DIR).exists()]
    return max(done, key=lambda p: p.name) if done else None


def prune(run_storage: str | Path, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the newest `keep` checkpoint directories, never one named in `protect` (the best).

    The engine prunes itself instead of Ray Train's `num_to_keep`: Ray's retention deleted the same
    directory twice after elastic restarts (and then failed the run), and it cannot know that the PS
    state lives inside the directory too.
    """
    root = Path(run_storage)
    dirs = sorted(p for p in root.glob("checkpoint_*") if p.is_dir())
    doomed = [p for p in dirs[: max(0, len(dirs) - keep)] if p.name not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in doomed]


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints


def reconcile_ray_snapshot(run_storage: str | Path) -> list[str]:
    """Forget, in Ray Train's run snapshot, the checkpoints `prune` deleted; returns their names.

    Ray Train refuses to start on a run directory whose snapshot names a checkpoint that is gone
    ("corrupted run directory"), so without this a second run on a finished run's run_dir (e.g. a
    second `make demo`) failed instead of resuming. Called before each fit; written atomically.
    """
    root = Path(run_storage)
    path = root / RAY_SNAPSHOT
    if not path.exists():
        return []
    snap = json.loads(path.read_text())
    results, indices = snap.get("checkpoint_results", []), snap.get("checkpoint_report_indices", [])
    gone = [r["checkpoint_dir_name"] for r in results if not (root / r["checkpoint_dir_name"]).is_dir()]
    if not gone:
        return []
    present = [(r, i) for r, i in zip(results, indices) if r["checkpoint_dir_name"] not in gone]
    snap["checkpoint_results"] = [r for r, _ in present]
    snap["checkpoint_report_indices"] = [i for _, i in present]
    latest = snap.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] in gone:
        snap["latest_checkpoint_result"] = present[-1][0] if present else None
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if isinstance(snap.get(key), list):
            snap[key] = [name for name in snap[key] if name not in gone]
    write_json_atomic(path, snap)
    return gone
