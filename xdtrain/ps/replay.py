"""The client's log of pushes, evictions, lr scales and imports since the last checkpoint, replayed
after a shard fails.

Gradients are copied into large reusable blocks rather than fresh arrays: on the dev VM a page
fault costs ~15 us, so keeping a fresh 16 MB copy per push costs ~60 ms in faults against ~3 ms
for the copy. Blocks are pre-faulted in one go (MAP_POPULATE) when created and kept across
checkpoints, so after the first checkpoint interval logging is one memcpy per push. Past
`max_bytes` the log is dropped (and its memory freed) until the next checkpoint.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

_BLOCK = 64 << 20


def _block(nbytes: int) -> np.ndarray:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8)


class ReplayLog:
    """Entries ("push", table, step, ids, grads), ("evict", table, step, None, None) and
    (kind, table, step, None, arg) of other changes (`add_control`), in order."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.overflowed = False
        self._blocks: list[np.ndarray] = []
        self._entries: list[tuple] = []
        self._block_i = 0  # the block being filled
        self._offset = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._entries)

    @property
    def nbytes(self) -> int:
        """Memory held by the log's blocks."""
        return sum(len(b) for b in self._blocks)

    def _copy(self, arr: np.ndarray) -> np.ndarray | None:
        """A copy of arr in the blocks, or None when the log would exceed max_bytes."""
        n = (arr.nbytes + 63) // 64 * 64
        while True:
            if self._block_i < len(self._blocks) and self._offset + n <= len(self._blocks[self._block_i]):
                raw = self._blocks[self._block_i][self._offset : self._offset + arr.nbytes]
                self._offset += n
                out = raw.view(arr.dtype).reshape(arr.shape)
                out[...] = arr
                return out
            if self._block_i + 1 < len(self._blocks):
                self._block_i, self._offset = self._block_i + 1, 0
                continue
            size = max(_BLOCK, n)
            if self.nbytes + size > self.max_bytes:
                return None
            self._blocks.append(_block(size))
            self._block_i, self._offset = len(self._blocks) - 1, 0

    def add_push(self, table: str, step: int, ids: np.ndarray, grads: np.ndarray) -> bool:
        """Log a push (copied); False if the log overflowed instead (and is now dropped)."""
        if self.overflowed:
            return False
        ids_c = self._copy(ids)
        grads_c = self._copy(grads) if ids_c is not None else None
        if grads_c is None:
            self.overflowed = True
            self._entries, self._blocks = [], []
            self._block_i = self._offset = 0
            return False
        self._entries.append(("push", table, step, ids_c, grads_c))
        return True

    def add_evict(self, table: str, step: int) -> None:
        if not self.overflowed:
            self._entries.append(("evict", table, step, None, None))

    def add_control(self, kind: str, table: str, step: int, arg: object) -> None:
        """Log a change that is not a push: `arg` is what replaying it needs (small: an lr scale,
        the URL of an import)."""
        if not self.overflowed:
            self._entries.append((kind, table, step, None, arg))

    def truncate(self) -> None:
        """Forget all entries (a checkpoint holding them committed); keep the blocks for reuse."""
        self._entries = []
        self._block_i = self._offset = 0
        self.overflowed = False
