"""Engine checkpoints: one directory per checkpoint, consistent at one step.

    checkpoint_00000420/
      engine.json          step, position in the program, best validation, PS location  (rank 0)
      dense.safetensors    the model's dense state_dict                                   (rank 0)
      optimizer.pt         every named dense optimizer's state and schedule (weights_only)  (rank 0)
      cursor-rank{r}.json  each worker's streaming-reader cursor of every stream           (every rank)
      ps/                  every PS shard: rows, optimizer state, id map; manifest last     (the shards)
      MANIFEST.json        every file above with its size and sha256, written last          (rank 0)

Ray Train merges the workers' files into the run's `checkpoint_*` directory. The PS shards write
`ps/` straight to that directory (they may live on other nodes), before the workers report, with
their own manifest written last. When every worker has reported, rank 0 writes `MANIFEST.json`:
a checkpoint counts only from then on. `latest_checkpoint` and resume (`resume_point`) verify it
(every listed file present, of its size and checksum) and skip anything incomplete, such as the
remains of a crash or a full disk mid-write; `prune` deletes such remains once a newer checkpoint
is complete. A full disk met while writing one raises `DiskFullError` naming the checkpoint; the
previous one stays loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from xdtrain.config import ConfigError
from xdtrain.data.schemas import DataError
from xdtrain.outputs import (
    MARKER,
    AtomicFile,
    DiskFullError,
    disk_full,
    remove_owned,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

ENGINE_FILE = "engine.json"
DENSE_FILE = "dense.safetensors"
OPTIM_FILE = "optimizer.pt"
PS_DIR = "ps"
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "xdtrain-engine-checkpoint"
REQUIRED = (ENGINE_FILE, DENSE_FILE, OPTIM_FILE, f"{PS_DIR}/MANIFEST.json", "cursor-rank0.json")


def checkpoint_name(step: int, attempt: int = 0) -> str:
    """Unique per worker-group attempt: a step redone after a restart never reuses a directory that
    Ray Train registered (or deleted) before. Sorted by name = sorted by (step, attempt)."""
    return f"checkpoint_{step:09d}_a{attempt:03d}"


def cursor_file(rank: int) -> str:
    return f"cursor-rank{rank}.json"


@dataclass
class EngineState:
    """Where training stands; saved in engine.json."""

    step: int = 0  # iterations taken (global: every worker steps together)
    epoch: int = 0  # phase epochs completed, over all phases
    world_size: int = 1
    # position in the program (xdtrain/train/plan.py)
    phase: int = 0
    round: int = 0
    step_index: int = 0  # the step within the round
    step_iter: int = 0  # iterations done in that step
    step_epochs: int = 0  # epochs of its main stream done in that step (steps that count epochs)
    phase_epoch: int = 0
    phase_iter: int = 0
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
        if "phase" not in d:  # a checkpoint of the single-phase engine: epoch was the one in progress
            d["epoch"] += int(d.pop("epoch_done", False))
            d["phase_epoch"] = d["epoch"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_rank0(directory: str | Path, state: EngineState, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes_atomic(d / DENSE_FILE, save_safetensors(tensors))
    with AtomicFile(d / OPTIM_FILE) as f:
        torch.save(optimizer.state_dict(), f)
    write_text_atomic(d / ENGINE_FILE, state.to_json())


def save_cursor(directory: str | Path, rank: int, cursors: dict[str, dict]) -> None:
    """One rank's reader cursor of every stream."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / cursor_file(rank), json.dumps({"streams": cursors}))


# ---------------------------------------------------------------- the manifest: what makes a checkpoint count


def _listed_files(directory: Path) -> list[str]:
    """Every file below `directory` (relative, '/'-separated), but the manifest and hidden names
    (temporaries of atomic writes in progress, ownership markers)."""
    out = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            rel = Path(parent, f).relative_to(directory).as_posix()
            if not f.startswith(".") and rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str | Path) -> dict:
    """Record every file of checkpoint `directory` with its size and sha256 in MANIFEST.json, written
    atomically and last: from now on the checkpoint counts. Returns the manifest."""
    d = Path(directory)
    files = {rel: {"size": (d / rel).stat().st_size, "sha256": _sha256(d / rel)} for rel in _listed_files(d)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    write_json_atomic(d / MANIFEST_FILE, manifest)
    return manifest


def verify(directory: str | Path, checksums: bool = True) -> str:
    """Why `directory` is not a complete checkpoint ('' when it is): no or a bad manifest, a file
    missing, of another size or (with `checksums`) another sha256 than its manifest says."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
    except FileNotFoundError:
        return "no such checkpoint directory" if not d.is_dir() else f"no {MANIFEST_FILE}: it was never completed"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST_FILE} ({e})"
    if not isinstance(files, dict):
        return f"{MANIFEST_FILE} is not an xdtrain checkpoint manifest"
    missing = [r for r in REQUIRED if r not in files]
    if missing:
        return f"{MANIFEST_FILE} lists no {missing[0]}"
    for rel, meta in files.items():
        path = d / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != meta.get("size"):
            return f"{rel} has {size} bytes, the manifest says {meta.get('size')}"
        if checksums and _sha256(path) != meta.get("sha256"):
            return f"{rel} does not match its sha256 in the manifest"
    return ""


def is_complete(directory: str | Path, checksums: bool = True) -> bool:
    return not verify(directory, checksums)


def require_complete(directory: str | Path) -> None:
    """Raise DataError naming `directory` and what is wrong unless it is a complete checkpoint."""
    why = verify(directory)
    if why:
        raise DataError(f"{directory}: not a complete xdtrain checkpoint ({why})")


def open_checkpoint(directory: str | Path) -> EngineState:
    """The state of a checkpoint a user names (init_from, resume_from), verified first."""
    require_complete(directory)
    return load_state(directory)


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


def load_optimizer_partial(directory: str | Path, optimizers) -> TransferReport:
    """Transfer with kept optimizer state: each parameter of each named optimizer (an
    `OptimizerSet`) takes the saved state of the parameter of the same name in the optimizer of the
    same name (new parameters start fresh); hyper-parameters (lr, betas, weight decay) stay the
    current ones and schedules start over."""
    path = Path(directory) / OPTIM_FILE
    saved = torch.load(path, weights_only=True)
    if "optimizers" not in saved:
        raise ConfigError(f"{path}: a checkpoint of the single-optimizer engine names no parameters, so its "
                          "optimizer state cannot be matched to this model (use transfer.dense_optimizer=fresh)")
    report = TransferReport()
    for name, opt in optimizers.items():
        s = saved["optimizers"].get(name)
        by_name = {} if s is None else {n: s["optimizer"]["state"][i] for i, n in enumerate(s["params"])
                                        if i in s["optimizer"]["state"]}
        current = opt.opt.state_dict()
        state = {}
        for i, (n, p) in enumerate(zip(opt.param_names, opt.params)):
            if n not in by_name:
                report.new.append(n)
                continue
            for key, v in by_name[n].items():
                if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    raise ConfigError(f"{path}: optimizer state {key!r} of {n!r} has shape {tuple(v.shape)}, "
                                      f"the parameter {tuple(p.shape)}")
            state[i] = by_name[n]
            report.loaded.append(n)
        current["state"] = state
        opt.opt.load_state_dict(current)
    loaded = set(report.loaded)
    report.dropped = [n for o in saved["optimizers"].values() for n in o["params"] if n not in loaded]
    return report


def load_cursors(directory: str | Path, world_size: int) -> dict[str, list[dict]]:
    """Every old rank's reader cursor of every stream: stream -> cursors in rank order."""
    out: dict[str, list[dict]] = {}
    for r in range(world_size):
        path = Path(directory) / cursor_file(r)
        if not path.exists():
            raise FileNotFoundError(f"{directory}: missing {cursor_file(r)} (checkpoint of {world_size} workers)")
        saved = json.loads(path.read_text())
        streams = saved["streams"] if "streams" in saved else {"train": saved}  # single-stream checkpoints
        for name, cursor in streams.items():
            out.setdefault(name, []).append(cursor)
    return out


def ps_url(directory: str | Path) -> str:
    return str(Path(directory) / PS_DIR)


def latest_checkpoint(run_storage: str | Path) -> Path | None:
    """The newest complete checkpoint directory under a run's storage (by step, then attempt), or
    None. Incomplete ones (`verify`) are skipped."""
    root = Path(run_storage)
    if not root.exists():
        return None
    for p in sorted(root.glob("checkpoint_*"), key=lambda p: p.name, reverse=True):
        if _NAME.fullmatch(p.name) and is_complete(p):
            return p
    return None


def resume_point(requested: str, run_storage: str | Path) -> str:
    """The checkpoint a (re)started worker group continues from ('' = from the start): the run's
    newest complete checkpoint, else `requested` (resume_from), which must be complete.

    Not Ray Train's latest registered checkpoint as such: it may be incomplete (a crash after the
    workers reported, before the manifest), and a newer complete one may be unregistered (a crash
    after the manifest, before Ray Train recorded it)."""
    newest = latest_checkpoint(run_storage)
    if newest is not None:
        return str(newest)
    if requested:
        require_complete(requested)
    return requested


# ---------------------------------------------------------------- a full disk


def raise_if_disk_full(e: BaseException, directory: str | Path, discard: bool) -> None:
    """When `e` is (or wraps) a full disk met writing checkpoint `directory`, raise one DiskFullError
    naming it and the previous complete checkpoint, after removing the partial one when `discard`
    (frees the space for the next try); otherwise return and let the caller re-raise `e`."""
    if disk_full(e) is None:
        return
    d = Path(directory)
    if discard and is_engine_checkpoint(d) and not is_complete(d, checksums=False):
        remove_owned(d, d.parent, created=is_engine_checkpoint)
    prev = latest_checkpoint(d.parent)
    keep = f"the previous checkpoint {prev} is intact" if prev else "there is no earlier checkpoint"
    raise DiskFullError(f"{d}: no space left on device while writing this checkpoint; {keep}") from e


def discard_incomplete(run_storage: str | Path) -> list[str]:
    """Delete the incomplete engine checkpoints of a run whose workers have all stopped (the driver,
    after a failed fit): a full disk may have stopped any rank mid-write, and only rank 0 discards
    its own partial checkpoint, so a retry's partial one could stay and hold the space."""
    root = Path(run_storage)
    doomed = [p for p in sorted(root.glob("checkpoint_*"))
              if is_engine_checkpoint(p) and not is_complete(p, checksums=False)]
    for p in doomed:
        remove_owned(p, root, created=is_engine_checkpoint)
    return [p.name for p in doomed]


_NAME = re.compile(r"checkpoint_\d{9}_a\d{3}")  # checkpoint_name's pattern
_LAYOUT = re.compile("|".join([*(re.escape(n) for n in (ENGINE_FILE, DENSE_FILE, OPTIM_FILE, PS_DIR, MARKER,
                                                         MANIFEST_FILE)),
                               r"cursor-rank\d+\.json", r"\..+\.tmp-.+"]))  # the engine's files, temporaries


def is_engine_checkpoint(path: str | Path) -> bool:
    """A folder the engine wrote: named by `checkpoint_name`, holding nothing but the engine's files
    (a complete checkpoint, or the part a crash left). Anything else is someone else's and is kept."""
    p = Path(path)
    return bool(_NAME.fullmatch(p.name)) and p.is_dir() and all(_LAYOUT.fullmatch(e) for e in os.listdir(p))


def prune(run_storage: str | Path, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the newest `keep` complete engine checkpoints, never one named in `protect` (the
    best), and the incomplete ones older than the newest complete one (a crash's remains; a newer
    incomplete one may still be being written).

    Only folders the engine wrote are counted or deleted (`is_engine_checkpoint`), and only inside
    an xdtrain-owned run directory (`remove_owned`). The engine prunes itself instead of Ray Train's
    `num_to_keep`: Ray's retention deleted the same directory twice after elastic restarts (and then
    failed the run), and it cannot know that the PS state lives inside the directory too.
    """
    root = Path(run_storage)
    dirs = sorted(p for p in root.glob("checkpoint_*") if is_engine_checkpoint(p))
    complete = [p for p in dirs if is_complete(p, checksums=False)]
    kept = {p.name for p in complete[max(0, len(complete) - keep):]} | protect
    newest = complete[-1].name if complete else ""
    doomed = [p for p in dirs if p.name not in kept and p.name < newest]
    for p in doomed:
        remove_owned(p, root, created=is_engine_checkpoint)
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
