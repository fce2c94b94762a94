"""`EmbeddingShard`: the Ray actor that holds one PS shard (a thin wrapper over `ShardServer`).

Every data request carries the caller's idea of the shard's incarnation and of the slot-map
version. A shard that Ray restarted after a crash comes up empty and refuses all requests
(`ShardNeedsRecovery`) until a client calls `recover`, which reloads the last checkpoint and
gives the shard a new incarnation; a client that still names the old incarnation gets
`ShardRestarted`, so it knows to replay its own pushes since that checkpoint.

Clients on the same node send data calls over a direct socket (`channel.py`, opened with
`open_channel`) instead of Ray calls; those run in the channel's threads, under the same lock as
the Ray calls, so the shard still executes one request at a time.
"""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import ray

from xdtrain.ps import channel
from xdtrain.ps.server import ShardServer
from xdtrain.ps.shm import ShmViews
from xdtrain.ps.table import TableSpec

CHANNEL_METHODS = frozenset({"pull", "push", "pull_shm", "pull_into", "push_shm"})
# requests routed by slot: they carry the caller's slot-map version
ROUTED_METHODS = CHANNEL_METHODS | frozenset({"evict", "import_rows"})
_ALLOWED = ROUTED_METHODS | frozenset(
    {
        "create_table",
        "info",
        "take_slots",
        "insert_rows",
        "drop_slots",
        "set_slot_map",
        "write_checkpoint",
        "load_checkpoint",
        "export",
        "inject_fault",
        "set_lr_scale",
    }
)


class ShardNeedsRecovery(RuntimeError):
    """This shard restarted after a failure and has not been reloaded from a checkpoint yet."""


class ShardRestarted(RuntimeError):
    """The shard was reset to a checkpoint since the caller last talked to it."""


class _EmbeddingShard:
    def __init__(self, index: int, slot_map: dict) -> None:
        self.index = index
        self.server = ShardServer(index, slot_map)
        self.incarnation = uuid.uuid4().hex
        self.needs_recovery = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.shm = ShmViews()
        self._lock = threading.Lock()  # Ray calls and channel requests take turns
        self._channel: channel.ChannelServer | None = None

    def hello(self) -> dict:
        return {
            "incarnation": self.incarnation,
            "needs_recovery": self.needs_recovery,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def open_channel(self) -> dict | None:
        """Start (once) the same-node request channel; its address and the token it requires."""
        if not channel.available():
            return None
        with self._lock:
            if self._channel is None:
                self._channel = channel.ChannelServer(self._serve_channel, CHANNEL_METHODS)
        return {"address": self._channel.address, "token": self._channel.token}

    def _serve_channel(self, method: str, incarnation: str | None, version: int | None, args: list):
        return self.call(incarnation, version, method, *args)

    def call(self, incarnation: str | None, version: int | None, method: str, *args):
        with self._lock:
            return self._call(incarnation, version, method, *args)

    def _call(self, incarnation: str | None, version: int | None, method: str, *args):
        if self.needs_recovery:
            raise ShardNeedsRecovery(f"shard {self.index} restarted and awaits recovery")
        if incarnation is not None and incarnation != self.incarnation:
            raise ShardRestarted(f"shard {self.index} was reset (incarnation {self.incarnation})")
        if method not in _ALLOWED:
            raise AttributeError(f"shard {self.index}: no method {method!r}")
        if method in ROUTED_METHODS:
            self.server.check_version(version)
        if method == "pull_shm":
            return self._pull_shm(*args)
        if method == "push_shm":
            return self._push_shm(*args)
        if method == "pull_into":
            return self._pull_into(*args)
        return getattr(self.server, method)(*args)

    # Requests in a client's shared-memory buffer: ids at offset 0, rows or grads at `off`.
    def _pull_shm(self, table: str, path: str, size: int, n: int, off: int, step: int) -> None:
        buf = self.shm.get(path, size)
        t = self.server.table(table)
        out = buf[off : off + n * t.spec.dim * t.rows.itemsize].view(t.rows.dtype).reshape(n, t.spec.dim)
        t.pull(buf[: n * 8].view(np.int64), step, out=out)

    def _pull_into(
        self,
        table: str,
        path: str,
        size: int,
        n: int,
        off: int,
        start: int,
        out_path: str,
        out_size: int,
        step: int,
    ) -> None:
        """Rows of the ids in `path` written straight to their places in the client's output buffer:
        rows start..start+n-1, or (start -1) the rows whose positions follow the ids at `off`."""
        buf = self.shm.get(path, size)
        t = self.server.table(table)
        out = self.shm.get(out_path, out_size)
        dim = t.spec.dim
        total = out_size // (4 * dim)
        out = out[: total * dim * 4].view(np.float32).reshape(total, dim)
        ids = buf[: n * 8].view(np.int64)
        if start < 0:
            t.pull_into(ids, step, out, buf[off : off + n * 8].view(np.int64))
        else:
            t.pull_into(ids, step, out[start : start + n])

    def _push_shm(self, table: str, path: str, size: int, n: int, off: int, step: int) -> int:
        buf = self.shm.get(path, size)
        dim = self.server.table(table).spec.dim
        grads = buf[off : off + n * dim * 4].view(np.float32).reshape(n, dim)
        return self.server.push(table, buf[: n * 8].view(np.int64), grads, step)

    def recover(
        self,
        known: str,
        slot_map: dict,
        specs: list[dict],
        url: str | None,
        manifest: dict | None,
        plan: dict | None = None,
    ) -> str:
        """Reset to the checkpoint at `url` as `plan` loaded it (or to empty tables), then serve
        under a new incarnation.

        `known` is the incarnation the caller last talked to. If the shard has been reset since
        (by another client), it is not reset again: the caller only needs to replay its pushes.
        """
        with self._lock:
            return self._recover(known, slot_map, specs, url, manifest, plan)

    def _recover(
        self,
        known: str,
        slot_map: dict,
        specs: list[dict],
        url: str | None,
        manifest: dict | None,
        plan: dict | None,
    ) -> str:
        if not self.needs_recovery and known != self.incarnation:
            return self.incarnation
        server = ShardServer(self.index, slot_map)
        if url is not None:
            server.load_checkpoint(url, manifest, plan)
        for spec in specs:  # tables created after the checkpoint start empty
            server.create_table(TableSpec.from_dict(spec))
        self.server = server
        self.incarnation = uuid.uuid4().hex
        self.needs_recovery = False
        return self.incarnation


EmbeddingShard = ray.remote(_EmbeddingShard)
