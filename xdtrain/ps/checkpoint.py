"""Shard checkpoints on any fsspec URL: .npy columns sorted by slot, and a manifest written last.

Layout under a checkpoint URL (one writer per URL at a time):

    MANIFEST.json                              the only entry point; replaced atomically
    data-<token>/shard-00003/<table>/ids.npy   one .npy per column: ids, rows, state.<name>,
                                    rows.npy   last_step, pending_ids, pending_counts, and the
                                    offsets.npy   slot offsets of both groups
    ...

Every file is written under a temporary name and renamed; a shard's files go into a fresh
`data-<token>` directory, and the manifest naming that directory is written last (again via a
temporary name), so a crash at any point leaves the previous manifest and its files intact.
Old data directories are removed only after the new manifest is in place.

Rows are stored sorted by virtual slot with per-slot offsets, so a shard restoring under a
different slot map reads just the byte ranges of the slots it owns (no unpickling: .npy
headers are parsed with numpy's safe header reader and object dtypes are refused).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable

import fsspec
import numpy as np

from xdtrain.outputs import AtomicFile, remove_owned, write_json_atomic
from xdtrain.ps.optim import state_layout
from xdtrain.ps.slots import slot_of
from xdtrain.ps.table import ShardTable, TableSpec

FORMAT = "xdtrain-ps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
_CHUNK_ROWS = 1 << 18


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: the message names the URL and file."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def new_token() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _write_npy(fs, path: str, arr: np.ndarray, order: np.ndarray | None) -> int:
    """Write arr[order] (or arr) as .npy, streamed in chunks, via a temporary name. Returns bytes."""
    if arr.dtype.hasobject:
        raise ValueError(f"{path}: refusing to write an object array")
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    with AtomicFile(path, fs) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, len(arr), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(arr))
            chunk = arr[start:stop] if order is None else np.take(arr, order[start:stop], axis=0)
            f.write(np.ascontiguousarray(chunk).tobytes())
    return int(fs.size(path))


def _read_header(f, path: str) -> tuple[tuple, np.dtype, int]:
    try:
        major, _ = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a valid .npy file ({e})") from e
    if fortran or dtype.hasobject:
        raise CheckpointError(f"{path}: unsupported .npy layout (fortran order or object dtype)")
    return shape, dtype, f.tell()


def read_npy_ranges(fs, path: str, ranges: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Rows [a, b) for each range (all rows if None) of a C-order .npy file, by ranged reads."""
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint file missing") from e
    with f:
        shape, dtype, offset = _read_header(f, path)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if ranges is None:
            ranges = [(0, shape[0])] if shape[0] else []
        total = sum(b - a for a, b in ranges)
        out = np.empty((total,) + tuple(shape[1:]), dtype=dtype)
        flat = out.reshape(total, -1).view(np.uint8) if total else None
        at = 0
        for a, b in ranges:
            if b > shape[0]:
                raise CheckpointError(f"{path}: range {a}:{b} beyond {shape[0]} rows (truncated checkpoint?)")
            f.seek(offset + a * row_bytes)
            data = f.read((b - a) * row_bytes)
            if len(data) != (b - a) * row_bytes:
                raise CheckpointError(f"{path}: file is truncated")
            flat[at : at + b - a] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, row_bytes)
            at += b - a
        return out


def write_table(
    fs, dirpath: str, table: ShardTable, num_slots: int, on_file: Callable[[str], None] | None = None
) -> dict:
    """Write one shard's table (rows sorted by slot) under `dirpath`; returns its manifest entry."""
    fs.makedirs(dirpath, exist_ok=True)
    cols = table.columns()
    slots = slot_of(cols["ids"], num_slots)
    order = np.argsort(slots, kind="stable")
    offsets = np.searchsorted(slots[order], np.arange(num_slots + 1)).astype(np.int64)
    pend = table.pending_columns()
    pslots = slot_of(pend["pending_ids"], num_slots)
    porder = np.argsort(pslots, kind="stable")
    poffsets = np.searchsorted(pslots[porder], np.arange(num_slots + 1)).astype(np.int64)
    files: dict[str, int] = {}
    groups = [(cols, order), (pend, porder), ({"offsets": offsets, "pending_offsets": poffsets}, None)]
    for group, ordr in groups:
        for name, arr in group.items():
            files[name] = _write_npy(fs, f"{dirpath}/{name}.npy", arr, ordr)
            if on_file is not None:
                on_file(name)
    return {
        "rows": int(table.n),
        "pending": int(len(pend["pending_ids"])),
        "step": int(table.step),
        "files": files,
    }


def _ranges(offsets: np.ndarray, slots: np.ndarray) -> list[tuple[int, int]]:
    """Merged [start, stop) row ranges covering `slots` (sorted) given per-slot offsets."""
    starts, stops = offsets[slots], offsets[slots + 1]
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    return list(zip(starts[np.r_[0, breaks]].tolist(), stops[np.r_[breaks - 1, len(stops) - 1]].tolist()))


def read_table_slots(
    fs, dirpath: str, entry: dict, slots: np.ndarray, optimizer_state: bool = True
) -> dict[str, np.ndarray]:
    """The columns of the rows (and admission counters) of one written table that fall in `slots`
    (without the optimizer state columns unless `optimizer_state`)."""
    slots = np.sort(np.asarray(slots, dtype=np.int64))
    for name, size in entry["files"].items():
        path = f"{dirpath}/{name}.npy"
        if not fs.exists(path) or int(fs.size(path)) != int(size):
            raise CheckpointError(f"{path}: missing or of the wrong size (expected {size} bytes)")
    out: dict[str, np.ndarray] = {}
    offsets = read_npy_ranges(fs, f"{dirpath}/offsets.npy")
    rr = _ranges(offsets, slots)
    poffsets = read_npy_ranges(fs, f"{dirpath}/pending_offsets.npy")
    pr = _ranges(poffsets, slots)
    for name in entry["files"]:
        if name.endswith("offsets") or (name.startswith("state.") and not optimizer_state):
            continue
        out[name] = read_npy_ranges(fs, f"{dirpath}/{name}.npy", pr if name.startswith("pending_") else rr)
    out["step"] = np.asarray([entry.get("step", 0)], dtype=np.int64)
    return out


def write_manifest(url: str, manifest: dict) -> str:
    """Atomically replace MANIFEST.json under `url` (the commit point of a checkpoint)."""
    fs, root = url_to_fs(url)
    return write_json_atomic(f"{root}/{MANIFEST}", manifest, fs, indent=1)


def read_manifest(url: str) -> dict:
    fs, root = url_to_fs(url)
    path = f"{root}/{MANIFEST}"
    try:
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no checkpoint manifest at {url}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


_DATA_DIR = re.compile(r"data-\d{8}-\d{6}-[0-9a-f]{8}")  # new_token's pattern
_SHARD_DIR = re.compile(r"shard-\d{5}")


def is_data_dir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A folder a checkpoint's shards wrote: named `data-<token>`, holding only `shard-NNNNN` folders."""
    name = path.rstrip("/").rpartition("/")[2]
    if not _DATA_DIR.fullmatch(name) or not fs.isdir(path):
        return False
    return all(_SHARD_DIR.fullmatch(e.rstrip("/").rpartition("/")[2]) for e in fs.ls(path, detail=False))


def _state_columns(spec: TableSpec) -> dict:
    return {k: (w, dt) for k, (w, dt, _) in state_layout(spec.optimizer, spec.dim).items()}


def restore_plan(
    manifest: dict,
    declared: dict[str, TableSpec] | None = None,
    tables: list[str] | None = None,
    optimizer_state: bool = True,
    url: str = "",
) -> dict:
    """What a restore loads, as plain data (it travels to Ray shards and into shard recovery):
    {"specs": {table: spec dict}, "restore": [tables read], "optimizer_state": bool,
     "lr_scale": {table: scale}}.

    The tables read (`tables`; None: every table of the checkpoint) take the spec the client
    declared for them (the current config: lr, ttl, a new optimizer), else the checkpoint's; every
    other declared table is created empty. Their lr scales come back with their optimizer state
    (1.0 when it starts fresh). CheckpointError when a table is not in the checkpoint, its dim
    differs, or optimizer state is kept across a change of optimizer (another state layout).
    """
    declared = declared or {}
    saved = manifest["tables"]
    names = list(saved) if tables is None else list(dict.fromkeys(tables))
    missing = [n for n in names if n not in saved]
    if missing:
        raise CheckpointError(f"{url}: tables {missing} are not in the checkpoint (it has {sorted(saved)})")
    specs: dict[str, dict] = {}
    for name in names:
        old = TableSpec.from_dict(saved[name])
        new = declared.get(name, old)
        if new.dim != old.dim:
            raise CheckpointError(f"{url}: table {name!r} has dim {old.dim} in the checkpoint, {new.dim} declared")
        if optimizer_state and _state_columns(new) != _state_columns(old):
            raise CheckpointError(
                f"{url}: table {name!r}: cannot keep the optimizer state of {old.optimizer.name!r} "
                f"for {new.optimizer.name!r} (restore it with fresh optimizer state)"
            )
        specs[name] = new.to_dict()
    for name, spec in declared.items():
        specs.setdefault(name, spec.to_dict())
    scales = manifest.get("lr_scale", {}) if optimizer_state else {}
    return {
        "specs": specs,
        "restore": names,
        "optimizer_state": bool(optimizer_state),
        "lr_scale": {n: float(scales[n]) for n in names if n in scales},
    }


def remove_stale_data(url: str, keep: str) -> None:
    """Delete the data folders of older or crashed checkpoints under `url` (not `keep`): only those
    the shards wrote (`is_data_dir`), inside a checkpoint folder xdtrain owns."""
    fs, root = url_to_fs(url)
    for entry in fs.ls(root, detail=False):
        if entry.rstrip("/").rpartition("/")[2] != keep and is_data_dir(fs, entry):
            remove_owned(entry, root, fs, created=lambda p: is_data_dir(fs, p))
