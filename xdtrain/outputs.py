"""Where xdtrain writes, and what it may delete: the one home of atomic writes and output ownership.

Atomic files. A file is written under a hidden temporary name beside its destination, flushed to
disk, and renamed into place (`AtomicFile`, `write_bytes_atomic`, `write_text_atomic`,
`write_json_atomic`). An error on the way (a full disk, a crash of the writer) removes the temporary:
readers see the previous file or the new one, never half of one.

Ownership. A folder xdtrain creates as an output holds a marker file, `.xdtrain-owned` (JSON: what it
is, its own path, job, pid, host, time). The marker names the path it was written for, so a copied or
moved folder is not taken for xdtrain's.

- `claim_output_dir`: the folder a job writes into (a run directory). Created and marked when absent;
  an empty folder is marked; a non-empty folder without the marker is refused unless the caller
  passes `overwrite`.
- `StagedDir`: a folder published whole (a dataset, a world, a graph). Built under a
  hidden temporary name, then swapped in; the previous version is replaced only if xdtrain made it.
- `remove_owned`: every deletion of a previous output goes through it. It deletes a path only inside
  an xdtrain-owned root and only if the path carries its own marker or matches the caller's record of
  what it writes (a name and layout).
- `/`, the home directory, the repository root and any folder holding one of them are never outputs,
  whatever the flags.

Paths are local paths or fsspec URLs; a function given `fs` takes a plain path on that filesystem.
Refusals raise `OutputError` (a `ConfigError`: the job runner turns it into one line and exit 2).
A full disk met anywhere (also inside Ray workers and actors) becomes one `DiskFullError` naming
where (`disk_full`): the job runner prints it as one line, exit 1.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from xdtrain.config import ConfigError

MARKER = ".xdtrain-owned"
OWNER = "xdtrain"
JOB_ENV = "XDTRAIN_JOB"  # set by the job runner; recorded in markers


class OutputError(ConfigError):
    """xdtrain refuses to write to or delete a path; the message names it and says how to proceed."""


class OutputExists(OutputError, FileExistsError):
    """An earlier xdtrain output is in the way and replacing it was not asked for."""


# ---------------------------------------------------------------- paths


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def resolve(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, canonical path): local paths absolute with symlinks resolved, remote ones unslashed."""
    text = str(path)
    if fs is None:
        fs, text = fsspec.core.url_to_fs(os.path.expanduser(text) if "://" not in text else text)
    else:
        text = fs._strip_protocol(text)
    if is_local(fs):
        return fs, os.path.realpath(text)
    return fs, text.rstrip("/") or text


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _protected() -> dict[str, str]:
    """Folders that are never outputs, with what they are: /, home, the repository and git roots."""
    out = {"/": "the filesystem root", os.path.realpath(Path.home()): "your home directory"}
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():
        out.setdefault(str(repo), "the repository root")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: no git root to protect there
        return out
    for d in (cwd, *cwd.parents):
        if (d / ".git").exists():
            out.setdefault(str(d), "the repository root")
            break
    return out


def check_not_protected(path: str | Path, what: str) -> str:
    """Refuse (OutputError) `/`, the home directory, the repository root or a folder holding one of them."""
    p = os.path.realpath(os.path.expanduser(str(path)))
    for root, name in _protected().items():
        if p == root or root.startswith(p.rstrip("/") + "/"):
            held = "" if p == root else f" (it holds {name}, {root})"
            raise OutputError(f"{what}: refusing {p}: it is {name if p == root else 'not a folder of its own'}"
                              f"{held}; choose a folder of its own, e.g. runs/<name>")
    return p


# ---------------------------------------------------------------- atomic files


class AtomicFile:
    """A binary file written under a hidden temporary name beside `path` and renamed into place by
    `commit` (or on leaving a `with` block without an error); `discard` (or an error) removes it.

        with AtomicFile("out/model.pt") as f:
            torch.save(state, f)
    """

    def __init__(self, path: str | Path, fs: fsspec.AbstractFileSystem | None = None):
        self.fs, self.path = resolve(path, fs)
        parent, name = _split(self.path)
        self.fs.makedirs(parent, exist_ok=True)
        self.tmp = f"{parent.rstrip('/')}/.{name}.tmp-{_tag()}"
        self.file: IO[bytes] = open(self.tmp, "wb") if is_local(self.fs) else self.fs.open(self.tmp, "wb")

    def commit(self) -> str:
        try:
            if not self.file.closed:
                self.file.flush()
                if is_local(self.fs):
                    os.fsync(self.file.fileno())  # a full disk fails here, before the rename
                self.file.close()
            if is_local(self.fs):
                os.replace(self.tmp, self.path)
            else:
                self.fs.mv(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            if is_local(self.fs):
                os.unlink(self.tmp)
            elif self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_bytes_atomic(path: str | Path, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Write `data` to `path` atomically; returns the canonical path."""
    atomic = AtomicFile(path, fs)
    with atomic as f:
        f.write(data)
    return atomic.path


def write_text_atomic(path: str | Path, text: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    return write_bytes_atomic(path, text.encode("utf-8"), fs)


def _plain(x: Any) -> Any:
    """numpy scalars/arrays -> Python; anything else JSON cannot hold -> its str."""
    return x.tolist() if hasattr(x, "tolist") else str(x)


def write_json_atomic(path: str | Path, obj: Any, fs: fsspec.AbstractFileSystem | None = None,
                      indent: int = 2) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=_plain), fs)


# ---------------------------------------------------------------- a full disk


class DiskFullError(OSError):
    """No space left on the device being written: one line naming where (a file, a folder)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __reduce__(self):  # travels from a Ray worker to the driver
        return (type(self), (self.strerror,))

    def __str__(self) -> str:
        return self.strerror


def _causes(e: BaseException):
    """`e` and what it wraps: causes, contexts, and Ray's wrappers of a worker's or a task's error."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None), getattr(x, "_base_exc", None),
                 getattr(x, "controller_failure", None), *getattr(x, "worker_failures", {}).values()]


def disk_full(e: BaseException, where: str | Path = "") -> DiskFullError | None:
    """The full disk `e` is or wraps, as one DiskFullError (None when it is none): its own message
    when it is one already, else naming the file that failed (or `where` when the error names none)."""
    found = None
    for x in _causes(e):
        if isinstance(x, DiskFullError):
            return DiskFullError(str(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC and found is None:
            found = x
    if found is None and not any("No space left on device" in str(x) for x in _causes(e)):
        return None
    path = getattr(found, "filename", None) or where
    return DiskFullError(f"{path}: no space left on device" if path else "no space left on device")


# ---------------------------------------------------------------- ownership


def _has_entries(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return bool(os.listdir(path) if is_local(fs) else fs.ls(path, detail=False))


def _mark(fs: fsspec.AbstractFileSystem, path: str, what: str, final: str) -> None:
    """Write the marker into folder `path`, naming `final` (where the folder will live)."""
    record = {"owner": OWNER, "what": what, "path": final, "job": os.environ.get(JOB_ENV, ""),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "host": socket.gethostname()}
    write_json_atomic(f"{path.rstrip('/')}/{MARKER}", record, fs)


def read_marker(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> dict | None:
    """The marker record of folder `path`, or None when it has none (or not xdtrain's)."""
    fs, p = resolve(path, fs)
    try:
        with fs.open(f"{p.rstrip('/')}/{MARKER}", "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("owner") == OWNER else None


def is_owned(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> bool:
    """Whether `path` is a folder xdtrain created at this very path (its marker names it)."""
    fs, p = resolve(path, fs)
    record = read_marker(p, fs)
    return record is not None and record.get("path") == p


def owner_of(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> str | None:
    """The nearest folder at or above `path` that xdtrain owns, or None."""
    fs, p = resolve(path, fs)
    while True:
        if is_owned(p, fs):
            return p
        parent, _ = _split(p)
        if parent == p or not p.strip("/"):
            return None
        p = parent


def claim_output_dir(path: str | Path, what: str, overwrite: bool = False,
                     fs: fsspec.AbstractFileSystem | None = None, overwrite_key: str | None = "overwrite") -> Path:
    """The folder a job writes into, created and marked if absent; returns its canonical path.

    An existing folder is accepted when xdtrain owns it or it is empty (it is then marked); a
    non-empty folder without the marker only with `overwrite` (then marked). `/`, home, the repository
    root and their parents are refused always. `overwrite_key` names the caller's flag in the message.
    """
    fs, p = resolve(path, fs)
    if is_local(fs):
        check_not_protected(p, what)
    if fs.exists(p):
        if not fs.isdir(p):
            raise OutputError(f"{what}: {p} is a file, not a folder; choose a folder")
        if is_owned(p, fs):
            return Path(p)
        if _has_entries(fs, p) and not overwrite:
            how = f", or set {overwrite_key}=true to write into it anyway" if overwrite_key else ""
            raise OutputError(f"{what}: {p} is not empty and was not created by xdtrain (no {MARKER}); "
                              f"choose a new or empty folder{how}")
    fs.makedirs(p, exist_ok=True)
    _mark(fs, p, what, p)
    return Path(p)


def remove_owned(path: str | Path, root: str | Path, fs: fsspec.AbstractFileSystem | None = None,
                 created: Callable[[str], bool] | None = None) -> None:
    """Delete `path` (a file or folder) only if it lies inside `root`, `root` is (inside) a folder
    xdtrain owns, and `path` is xdtrain's: it carries its own marker, or `created(canonical path)`
    (the caller's record of what it writes) says so. Otherwise raise OutputError and delete nothing."""
    fs, p = resolve(path, fs)
    _, r = resolve(root, fs)
    if is_local(fs):
        check_not_protected(p, "delete")
    if not p.startswith(r.rstrip("/") + "/"):
        raise OutputError(f"refusing to delete {p}: it is not inside {r}")
    if owner_of(r, fs) is None:
        raise OutputError(f"refusing to delete {p}: {r} is not in a folder xdtrain created (no {MARKER})")
    if not fs.exists(p):
        return
    if not (is_owned(p, fs) or (created is not None and created(p))):
        raise OutputError(f"refusing to delete {p}: xdtrain did not create it (no {MARKER}); it is left as it is")
    _rm(fs, p)


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` runs on this host (one of another user's counts too)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _rm(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if is_local(fs):
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    else:
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- folders published whole


class StagedDir:
    """A folder built under a hidden temporary name beside `out` (`.path`, marked), swapped in as
    `out` by `commit` (or on leaving a `with` block without an error); `discard` removes it.

    An existing `out` may be replaced only if it is empty, or if xdtrain made it and `replace` is set
    (`replace_key` names the caller's flag in the message); anything else is refused up front, before
    any work, and left untouched. Locally the old version is renamed aside, the new one renamed in,
    then the old one deleted: readers see one version or the other.
    """

    def __init__(self, out: str | Path, what: str, replace: bool = True,
                 fs: fsspec.AbstractFileSystem | None = None, replace_key: str | None = None):
        self.fs, self.out = resolve(out, fs)
        self.what, self.replace, self.replace_key = what, replace, replace_key
        if is_local(self.fs):
            check_not_protected(self.out, what)
        self._check_out()
        parent, name = _split(self.out)
        self.fs.makedirs(parent, exist_ok=True)
        self._remove_stale_stages(parent, f".{name}.tmp-")
        self.path = f"{parent.rstrip('/')}/.{name}.tmp-{_tag()}"
        if is_local(self.fs):
            os.mkdir(self.path)
        else:
            self.fs.makedirs(self.path, exist_ok=False)
        _mark(self.fs, self.path, what, self.out)

    def _remove_stale_stages(self, parent: str, prefix: str) -> None:
        """Staging folders for this `out` that a dead process on this host left behind (its marker
        says so); any other entry is left alone."""
        for entry in self.fs.ls(parent, detail=False):
            if not entry.rstrip("/").rpartition("/")[2].startswith(prefix):
                continue
            rec = read_marker(entry, self.fs) or {}
            mine = rec.get("path") == self.out and rec.get("host") == socket.gethostname()
            if mine and not pid_alive(rec.get("pid")):
                _rm(self.fs, resolve(entry, self.fs)[1])

    def _check_out(self) -> None:
        fs, out = self.fs, self.out
        if not fs.exists(out):
            return
        if not fs.isdir(out):
            raise OutputError(f"{self.what}: {out} is a file; move it away or choose another path")
        if not _has_entries(fs, out):
            return
        if not is_owned(out, fs):
            raise OutputError(f"{self.what}: {out} exists and was not created by xdtrain (no {MARKER}); "
                              "it is left untouched: move it away or choose another path")
        if not self.replace:
            how = f" ({self.replace_key}=true replaces it)" if self.replace_key else ""
            raise OutputExists(f"{self.what}: {out} already exists{how}")

    def commit(self) -> str:
        try:
            self._check_out()  # again: it may have changed while the new version was built
            if is_local(self.fs):
                self._swap_local()
            else:
                if self.fs.exists(self.out):
                    self.fs.rm(self.out, recursive=True)
                self.fs.mv(self.path, self.out, recursive=True)
        except BaseException:
            self.discard()
            raise
        return self.out

    def _swap_local(self) -> None:
        old = None
        if os.path.lexists(self.out):
            parent, name = _split(self.out)
            old = f"{parent.rstrip('/')}/.{name}.old-{_tag()}"
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None and not os.path.lexists(self.out):
                os.replace(old, self.out)  # put the previous version back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # checked above: xdtrain's, or empty

    def discard(self) -> None:
        if self.fs.exists(self.path):
            _rm(self.fs, self.path)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

