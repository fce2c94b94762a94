"""id -> virtual slot -> shard.

Ids hash into a fixed number of virtual slots (4096 by default); a `SlotMap` assigns slots to
shards. Changing the shard count moves whole slots (and only as many as balance requires),
never re-hashes ids, and a checkpoint written under one map restores under any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xdtrain.ps.init import _GOLDEN, _M1, _M2, _U27, _U30, _U31

DEFAULT_NUM_SLOTS = 4096
_SLOT_SALT = np.uint64(0x5EED5107ABCDEF01)  # keeps slot hashing independent of the initializer's


def slot_of(ids: np.ndarray, num_slots: int) -> np.ndarray:
    """Virtual slot (int64 in [0, num_slots)) of each int64 id: mix64(id ^ salt) % num_slots."""
    z = np.bitwise_xor(np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64), _SLOT_SALT)
    # mix64 in place (one scratch array instead of a fresh temporary per operation)
    z += _GOLDEN
    t = np.empty_like(z)
    for shift, mul in ((_U30, _M1), (_U27, _M2)):
        np.right_shift(z, shift, out=t)
        z ^= t
        z *= mul
    np.right_shift(z, _U31, out=t)
    z ^= t
    if num_slots & (num_slots - 1) == 0:
        z &= np.uint64(num_slots - 1)
    else:
        z %= np.uint64(num_slots)
    return z.view(np.int64)


@dataclass
class SlotMap:
    """slot_to_shard[s] is the shard that owns slot s; `version` changes on every reshard."""

    slot_to_shard: np.ndarray
    version: int = 0
    # the same map in the narrowest dtype: argsort of int8 shard numbers is a radix sort
    _compact: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        small = len(self.slot_to_shard) == 0 or int(self.slot_to_shard.max()) < 127
        self._compact = self.slot_to_shard.astype(np.int8 if small else np.int32)

    @property
    def num_slots(self) -> int:
        return len(self.slot_to_shard)

    @property
    def num_shards(self) -> int:
        return int(self.slot_to_shard.max()) + 1 if len(self.slot_to_shard) else 0

    @classmethod
    def even(cls, num_slots: int, num_shards: int) -> SlotMap:
        """Contiguous, balanced blocks of slots per shard."""
        if num_shards < 1 or num_slots < num_shards:
            raise ValueError(f"need 1 <= num_shards <= num_slots, got {num_shards} shards, {num_slots} slots")
        return cls((np.arange(num_slots, dtype=np.int64) * num_shards // num_slots).astype(np.int32))

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """Shard of each id (int32)."""
        return self.slot_to_shard.take(slot_of(ids, self.num_slots))

    def split(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions in ids, increasing) for every shard that owns some of `ids`."""
        shard = self._compact.take(slot_of(ids, self.num_slots))
        # one stable sort (a radix sort for int8) instead of a mask and nonzero per shard
        order = np.argsort(shard, kind="stable")
        counts = np.bincount(shard, minlength=self.num_shards)
        bounds = np.cumsum(counts)
        return [
            (k, order[bounds[k] - counts[k] : bounds[k]]) for k in range(self.num_shards) if counts[k]
        ]

    def slots_of(self, shard: int) -> np.ndarray:
        return np.flatnonzero(self.slot_to_shard == shard).astype(np.int64)

    def rebalance(self, num_shards: int) -> SlotMap:
        """A balanced map over `num_shards` that moves as few slots as possible from this one."""
        if num_shards < 1 or self.num_slots < num_shards:
            raise ValueError(f"need 1 <= num_shards <= {self.num_slots}, got {num_shards}")
        base, extra = divmod(self.num_slots, num_shards)
        target = np.full(num_shards, base, dtype=np.int64)
        target[:extra] += 1
        new = np.full(self.num_slots, -1, dtype=np.int32)
        for k in range(min(num_shards, self.num_shards)):
            keep = self.slots_of(k)[: target[k]]
            new[keep] = k
        free = np.flatnonzero(new < 0)
        counts = np.bincount(new[new >= 0], minlength=num_shards)
        fill = np.repeat(np.arange(num_shards), target - counts)
        new[free] = fill
        return SlotMap(new, self.version + 1)

    def moves(self, new: SlotMap) -> dict[tuple[int, int], np.ndarray]:
        """(source shard, destination shard) -> the slots that change hands going to `new`."""
        out: dict[tuple[int, int], np.ndarray] = {}
        changed = np.flatnonzero(self.slot_to_shard != new.slot_to_shard)
        for s in changed:
            out.setdefault((int(self.slot_to_shard[s]), int(new.slot_to_shard[s])), []).append(int(s))
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}

    def to_dict(self) -> dict:
        return {"version": int(self.version), "slot_to_shard": self.slot_to_shard.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> SlotMap:
        return cls(np.asarray(d["slot_to_shard"], dtype=np.int32), int(d["version"]))
