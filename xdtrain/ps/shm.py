"""Shared-memory request buffers between a PS client and the shards on its own node.

Ray moves a large numpy argument or result through its object store: a create/copy/seal per
object plus page faults on fresh store memory, ~10-20 ms for 8 MB on the 2-core dev box against
~1 ms for the copy itself. For same-node shards the client instead keeps a few reusable buffers
(files in /dev/shm, mapped by both processes): it writes ids (and gradients) straight into one,
the Ray call carries only the file name and sizes, and the shard gathers rows straight into the
same buffer. Pages are touched once and reused, so the steady state is one copy each way.

A buffer is owned by one in-flight call at a time; the client releases it when the call's
result has been consumed. Files are named xdps-<pid>-<random>-<n> and removed when the client
closes or its process exits. A process killed with SIGKILL (by a crash, or by Ray stopping a worker)
leaves them behind: `reclaim_orphans` removes the files whose owner pid no longer runs. Every
process runs it when it creates its first pool, and the engine's driver when a job ends.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
import weakref
from collections import OrderedDict

import numpy as np

from xdtrain.outputs import pid_alive

SHM_DIR = "/dev/shm"
MIN_SHM_BYTES = 96 * 1024  # below Ray's inline-argument limit the plain path is as cheap
_MAX_BUFFERS = 16  # per shard; beyond, calls fall back to the plain path
_ALIGN = 64
_NAME = re.compile(r"xdps-(\d+)-[0-9a-f]+-\d+")  # ShmPool's file names: the creator's pid first
_reclaimed = False  # this process ran `reclaim_orphans` at start-up


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _map(path: str, size: int, create: bool) -> np.ndarray:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)


class ShmBuffer:
    """One shared buffer: a file under /dev/shm and this process's mapping of it."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size
        self.data = _map(path, size, create=True)
        self.busy = False

    def view(self, offset: int, dtype, shape: tuple) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        return self.data[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def reclaim_orphans(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove the buffers of processes that are gone (`xdps-<pid>-...` files of this user whose pid
    no longer runs); returns their paths. Buffers of live processes and other users' files are kept."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _NAME.fullmatch(name)
        path = os.path.join(shm_dir, name)
        try:
            if m is None or os.stat(path).st_uid != os.getuid() or pid_alive(int(m.group(1))):
                continue
            os.unlink(path)
        except FileNotFoundError:  # its owner removed it meanwhile
            continue
        removed.append(path)
    return removed


class ShmPool:
    """The client's buffers for one shard."""

    def __init__(self) -> None:
        global _reclaimed
        if not _reclaimed:  # start-up: what crashed processes left behind
            _reclaimed = True
            reclaim_orphans()
        self._tag = f"xdps-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buffers: list[ShmBuffer] = []
        self._paths: list[str] = []  # shared with the finalizer, which removes the files
        self._count = 0
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

    def acquire(self, nbytes: int) -> ShmBuffer | None:
        """A free buffer of at least nbytes (created or grown as needed); None if all are busy."""
        free = [b for b in self._buffers if not b.busy]
        fits = [b for b in free if b.size >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: b.size)
        else:
            if free:  # replace the largest free buffer with a bigger one
                self._remove(max(free, key=lambda b: b.size))
            elif len(self._buffers) >= _MAX_BUFFERS:
                return None
            size = max(1 << 20, 1 << (int(nbytes) - 1).bit_length())
            self._count += 1
            buf = ShmBuffer(f"{SHM_DIR}/{self._tag}-{self._count}", size)
            self._buffers.append(buf)
            self._paths.append(buf.path)
        buf.busy = True
        return buf

    def _remove(self, buf: ShmBuffer) -> None:
        self._buffers.remove(buf)
        self._paths.remove(buf.path)
        _unlink_all([buf.path])

    def close(self) -> None:
        self._finalizer()
        self._buffers.clear()


class ShmViews:
    """The shard's side: mappings of client buffers by path (the most recent few are kept)."""

    def __init__(self, keep: int = 64) -> None:
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._keep = keep

    def get(self, path: str, size: int) -> np.ndarray:
        data = self._maps.get(path)
        if data is None or len(data) != size:
            if not os.path.basename(path).startswith("xdps-") or os.path.dirname(path) != SHM_DIR:
                raise ValueError(f"not a PS shared-memory buffer: {path}")
            data = _map(path, size, create=False)
            self._maps[path] = data
            while len(self._maps) > self._keep:
                self._maps.popitem(last=False)
        self._maps.move_to_end(path)
        return data
