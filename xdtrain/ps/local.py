"""In-process PS backend: the same API as `PSClient`, shards are plain objects, no Ray.

For small runs, tests, and as the benchmark baseline. Calls execute immediately, so pushes
are synchronous and there is nothing to recover.
"""

from __future__ import annotations

from xdtrain.ps.router import Call, Router
from xdtrain.ps.server import ShardServer
from xdtrain.ps.slots import DEFAULT_NUM_SLOTS, SlotMap


class _Done:
    __slots__ = ("value", "error")

    def __init__(self, value=None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class LocalPS(Router):
    """A PS whose shards live in this process."""

    def __init__(self, num_shards: int = 1, num_slots: int = DEFAULT_NUM_SLOTS, staleness: int = 0) -> None:
        slot_map = SlotMap.even(num_slots, num_shards)
        super().__init__(slot_map, staleness)
        self.shards = [ShardServer(k, slot_map.to_dict()) for k in range(num_shards)]

    @classmethod
    def from_checkpoint(cls, url: str, num_shards: int = 1, staleness: int = 0) -> LocalPS:
        from xdtrain.ps.checkpoint import read_manifest

        ps = cls(num_shards, read_manifest(url)["num_slots"], staleness)
        ps.restore(url)
        return ps

    def _submit(self, call: Call) -> None:
        try:
            call.handle = _Done(getattr(self.shards[call.shard], call.method)(*call.args))
        except Exception as e:  # surfaced by _wait, like a remote error
            call.handle = _Done(error=e)

    def _wait(self, calls: list[Call]) -> list:
        for c in calls:
            if c.handle.error is not None:
                raise c.handle.error
        return [c.handle.value for c in calls]

    def _reap(self) -> None:
        calls, self._inflight = self._inflight, []
        self._wait(calls)

    def _add_shards(self, indices: list[int], slot_map: SlotMap) -> None:
        for k in indices:
            assert k == len(self.shards)
            self.shards.append(ShardServer(k, slot_map.to_dict()))

    def _close_shards(self, indices: list[int]) -> None:
        for k in sorted(indices, reverse=True):
            assert k == len(self.shards) - 1
            self.shards.pop()

    def inject_fault(self, shard: int, point: str, after: int = 0) -> None:
        """Arm a fault in one shard (tests of crash safety); see ShardServer.inject_fault."""
        self.shards[shard].inject_fault(point, after)
