"""One shard's logic, free of Ray: the tables it holds for its slots, and its bulk operations.

The in-process backend calls a `ShardServer` directly; the Ray actor (`shard.py`) wraps one.
"""

from __future__ import annotations

import numpy as np

from xdtrain.ps import checkpoint as ckpt
from xdtrain.ps.export import write_shard_export
from xdtrain.ps.optim import check_lr_scale
from xdtrain.ps.slots import SlotMap, slot_of
from xdtrain.ps.table import ShardTable, TableSpec


class InjectedFault(RuntimeError):
    """Raised at a fault point armed by `inject_fault` (tests of crash safety)."""


class StaleSlotMap(RuntimeError):
    """The caller routed with an older slot map than this shard's; it should refresh and retry."""


class ShardServer:
    """The tables of one shard. Methods take numpy arrays and return numpy arrays or plain data."""

    def __init__(self, index: int, slot_map: dict) -> None:
        self.index = index
        self.tables: dict[str, ShardTable] = {}
        self._faults: dict[str, int] = {}
        self.set_slot_map(slot_map)

    # ---- control -------------------------------------------------------------------------
    def set_slot_map(self, slot_map: dict) -> None:
        self.slot_map = SlotMap.from_dict(slot_map)
        self.owned = self.slot_map.slot_to_shard == self.index

    def check_version(self, version: int | None) -> None:
        if version is not None and version != self.slot_map.version:
            raise StaleSlotMap(
                f"shard {self.index}: slot map v{version} is stale (now v{self.slot_map.version})"
            )

    def create_table(self, spec: TableSpec | dict) -> None:
        spec = TableSpec.from_dict(spec) if isinstance(spec, dict) else spec
        old = self.tables.get(spec.name)
        if old is not None:
            if old.spec != spec:
                raise ValueError(f"table {spec.name!r} exists with a different spec: {old.spec} != {spec}")
            return
        self.tables[spec.name] = ShardTable(spec)

    def table(self, name: str) -> ShardTable:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(
                f"no table {name!r} on shard {self.index}; tables: {sorted(self.tables)}"
            ) from None

    def inject_fault(self, point: str, after: int = 0) -> None:
        """Arm a fault: the `after`+1-th time `point` is reached, raise InjectedFault."""
        self._faults[point] = int(after)

    def _tick(self, point: str) -> None:
        if point in self._faults:
            if self._faults[point] <= 0:
                del self._faults[point]
                raise InjectedFault(f"shard {self.index}: injected fault at {point}")
            self._faults[point] -= 1

    def set_lr_scale(self, table: str, scale: float) -> None:
        self.table(table).lr_scale = check_lr_scale(table, scale)

    def info(self) -> dict:
        return {name: {"rows": t.n, "bytes": t.nbytes(), "step": t.step} for name, t in self.tables.items()}

    # ---- training path ---------------------------------------------------------------------
    def pull(self, table: str, ids: np.ndarray, step: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.table(table).pull(ids, step, out)

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int) -> int:
        return self.table(table).push(ids, grads, step)

    def evict(self, table: str, step: int) -> int:
        return self.table(table).evict(step)

    def import_rows(self, table: str, ids: np.ndarray, rows: np.ndarray, step: int) -> int:
        return self.table(table).assign(ids, rows, step)

    # ---- moving slots between shards ---------------------------------------------------------
    def _select(self, t: ShardTable, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        want = np.zeros(self.slot_map.num_slots, dtype=bool)
        want[slots] = True
        rows = np.flatnonzero(want[slot_of(t.ids[: t.n], self.slot_map.num_slots)])
        pend = t.pending_columns()["pending_ids"]
        return rows, want[slot_of(pend, self.slot_map.num_slots)]

    def take_slots(self, slots: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Copies of every table's rows in `slots` (to be inserted on another shard)."""
        out = {}
        for name, t in self.tables.items():
            rows, pend = self._select(t, slots)
            out[name] = t.take(rows, pend)
        return out

    def insert_rows(self, payload: dict[str, dict[str, np.ndarray]]) -> int:
        n = 0
        for name, cols in payload.items():
            self.table(name).insert(cols)
            n += len(cols["ids"])
        return n

    def drop_slots(self, slots: np.ndarray) -> int:
        n = 0
        for t in self.tables.values():
            rows, pend = self._select(t, slots)
            if len(rows) or pend.any():
                t.drop(rows, pend)
            n += len(rows)
        return n

    # ---- checkpoints and export ---------------------------------------------------------------
    def write_checkpoint(self, url: str, subdir: str) -> dict:
        """Write every table under url/subdir; returns {table: manifest entry}."""
        fs, root = ckpt.url_to_fs(url)
        out = {}
        for name, t in self.tables.items():
            out[name] = ckpt.write_table(
                fs,
                f"{root}/{subdir}/{name}",
                t,
                self.slot_map.num_slots,
                on_file=lambda _: self._tick("checkpoint"),
            )
        return out

    def load_checkpoint(self, url: str, manifest: dict, plan: dict | None = None) -> int:
        """Replace all tables with the rows of this shard's slots found in the checkpoint.

        `plan` (checkpoint.restore_plan; None: the whole checkpoint as written): the tables to hold
        and their specs, which of them to read, whether to read their optimizer state, lr scales.
        """
        fs, root = ckpt.url_to_fs(url)
        if manifest["num_slots"] != self.slot_map.num_slots:
            raise ckpt.CheckpointError(
                f"{url}: checkpoint has {manifest['num_slots']} slots, this PS has {self.slot_map.num_slots}"
            )
        plan = plan or ckpt.restore_plan(manifest)
        old_map = SlotMap.from_dict(manifest["slot_map"])
        mine = np.flatnonzero(self.owned)
        self.tables = {}
        n = 0
        for name, spec in plan["specs"].items():
            self.create_table(spec)
            self.tables[name].lr_scale = float(plan["lr_scale"].get(name, 1.0))
            if name not in plan["restore"]:
                continue
            for j, shard in enumerate(manifest["shards"]):
                slots = mine[old_map.slot_to_shard[mine] == j]
                if len(slots) == 0 or name not in shard["tables"]:
                    continue
                cols = ckpt.read_table_slots(
                    fs, f"{root}/{shard['dir']}/{name}", shard["tables"][name], slots,
                    optimizer_state=plan["optimizer_state"],
                )
                self.tables[name].insert(cols)
                n += len(cols["ids"])
        return n

    def export(self, table: str, url: str, rows_per_file: int) -> list[dict]:
        return write_shard_export(url, self.table(table), self.index, rows_per_file)
