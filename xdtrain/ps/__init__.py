"""Parameter server: sharded embedding tables with server-side row-wise optimizers.

    from xdtrain.ps import PSClient, LocalPS, TableSpec, OptimizerSpec

    ps = PSClient(num_shards=4)              # Ray actors (LocalPS(): the same API in-process)
    ps.create_table(TableSpec("item", 64, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.05)))
    emb = ps.pull("item", ids)               # (len(ids), 64) float32 tensor; new ids are admitted
    ps.push("item", ids, emb_grad)           # summed per id, applied on the shards
    r = ps.route(np.unique(ids))             # ahead of time (batch builder): grouped by shard
    emb = ps.pull("item", r)                 # rows in r.ids order: no dedup, routing or scatter
    ps.checkpoint("s3://bucket/run/ps")      # restore onto any shard count: PSClient.from_checkpoint
    ps.restore(url, tables=["item"], optimizer_state=False)  # partial: other declared tables start empty
    ps.import_table("item", "s3://bucket/emb/item")          # rows from Parquet (id, vector), e.g. an export
    ps.set_lr_scale("item", 0.1)             # lr x 0.1 on every push until changed (kept in checkpoints)

`PSClient` is imported lazily so that the in-process backend does not import Ray.
"""

from __future__ import annotations

from typing import Any

from xdtrain.ps.checkpoint import CheckpointError
from xdtrain.ps.export import read_export
from xdtrain.ps.ids import RoutedIds
from xdtrain.ps.local import LocalPS
from xdtrain.ps.optim import OptimizerSpec
from xdtrain.ps.table import TableSpec

__all__ = [
    "CheckpointError", "LocalPS", "OptimizerSpec", "PSClient", "PSError", "RoutedIds", "TableSpec", "read_export",
]


def __getattr__(name: str) -> Any:
    if name in ("PSClient", "PSError"):
        from xdtrain.ps import client

        return getattr(client, name)
    raise AttributeError(f"module 'xdtrain.ps' has no attribute {name!r}")
