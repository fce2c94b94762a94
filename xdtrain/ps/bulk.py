"""Whole-table operations of a PS client: checkpoint, (partial) restore, elastic resharding,
export and import.

A mixin of `Router` (xdtrain/ps/router.py), which supplies the calls to shards (`_call`,
`_wait`, `_all`), `flush`, the table specs, steps and lr scales, and the hooks
`_on_commit`/`_on_control`/`_record`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from xdtrain.outputs import claim_output_dir
from xdtrain.ps import checkpoint as ckpt
from xdtrain.ps.export import read_vectors, write_export_manifest
from xdtrain.ps.table import TableSpec

if TYPE_CHECKING:
    from xdtrain.ps.router import Call

_MOVE_SLOTS = 128  # slots moved per request when resharding (bounds the in-flight copy)


class WholeTableOps:
    """checkpoint / restore / reshard / export over the shards of a `Router`."""

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, url: str) -> str:
        """Write every shard under `url`, then the manifest (the commit point). Returns its path.

        One writer per URL. Pushes are flushed first, so the checkpoint holds all pushes issued
        before the call and none after.
        """
        self.flush()
        t0 = time.perf_counter()
        claim_output_dir(url, "PS checkpoint", overwrite_key=None)  # never into a folder of someone else's
        token = ckpt.new_token()
        data_dir = f"data-{token}"
        subdirs = [f"{data_dir}/shard-{k:05d}" for k in range(self.num_shards)]
        infos = self._wait(
            [self._call(k, "write_checkpoint", url, subdirs[k]) for k in range(self.num_shards)]
        )
        manifest = {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "num_slots": self.slot_map.num_slots,
            "slot_map": self.slot_map.to_dict(),
            "tables": {name: spec.to_dict() for name, spec in self._specs.items()},
            "steps": dict(self._step),
            "lr_scale": dict(self._lr_scale),
            "shards": [{"dir": subdirs[k], "tables": infos[k]} for k in range(self.num_shards)],
        }
        path = ckpt.write_manifest(url, manifest)
        ckpt.remove_stale_data(url, keep=data_dir)
        self._on_commit(url)
        rows = sum(t["rows"] for info in infos for t in info.values())
        self._record("checkpoint", "*", rows, 0, time.perf_counter() - t0)
        return path

    def restore(self, url: str, tables: list[str] | None = None, optimizer_state: bool = True) -> None:
        """Load the checkpoint at `url` onto the current shards (any shard count).

        Afterwards the PS holds `tables` (default: every table of the checkpoint) with the
        checkpoint's rows, and every other table declared with `create_table` empty (fresh from
        its spec): a partial restore keeps some tables and starts others new. A restored table
        takes its declared spec when there is one (the new config's lr, ttl), else the
        checkpoint's. `optimizer_state=False` drops the per-row optimizer state (and lr scale) of
        the restored rows: they continue with fresh moments, as for a new task.

        Other copies of a PSClient on the same shards (e.g. in Ray Train workers) read the
        restored rows at once; each must call `checkpoint_committed(url)`, so that a later shard
        recovery does not replay its pushes from before the restore, and must not rely on rows it
        prefetched before it. After a partial restore (or an import), write a checkpoint before
        handing the PS to other clients: they only know whole checkpoints.
        """
        manifest = ckpt.read_manifest(url)
        if manifest["num_slots"] != self.slot_map.num_slots:
            raise ckpt.CheckpointError(
                f"{url}: checkpoint has {manifest['num_slots']} virtual slots, "
                f"this client {self.slot_map.num_slots}"
            )
        plan = ckpt.restore_plan(manifest, self._specs, tables, optimizer_state, url)
        self.flush()
        self._drop_prefetches()
        t0 = time.perf_counter()
        rows = self._all("load_checkpoint", url, manifest, plan)
        self._specs = {name: TableSpec.from_dict(d) for name, d in plan["specs"].items()}
        self._step = {n: int(manifest["steps"].get(n, 0)) if n in plan["restore"] else 0 for n in self._specs}
        self._lr_scale = dict(plan["lr_scale"])
        self._on_commit(url, plan)
        self._record("restore", "*", int(sum(rows)), 0, time.perf_counter() - t0)

    # ---- elastic resharding --------------------------------------------------------------------
    def reshard(self, num_shards: int) -> dict[tuple[int, int], int]:
        """Move to `num_shards` shards, moving whole slots (as few as balance needs).

        Returns {(source, destination): slots moved}. Other clients of the same shards must be
        handed a fresh copy of this client afterwards (shards reject requests routed with an old
        map). Not crash-safe: if a shard fails mid-way, restore the last checkpoint.
        """
        self.flush()
        self._drop_prefetches()
        old, new = self.slot_map, self.slot_map.rebalance(num_shards)
        if num_shards > old.num_shards:
            self._add_shards(list(range(old.num_shards, num_shards)), old)
            for k in range(old.num_shards, num_shards):
                self._wait([self._call(k, "create_table", spec) for spec in self._specs.values()])
                self._wait([self._call(k, "set_lr_scale", t, s) for t, s in self._lr_scale.items()])
        moves = old.moves(new)
        for (src, dst), slots in moves.items():
            for start in range(0, len(slots), _MOVE_SLOTS):
                chunk = slots[start : start + _MOVE_SLOTS]
                payload = self._call(src, "take_slots", chunk)
                self._wait([self._call(dst, "insert_rows", self._forward(payload))])
                self._wait([self._call(src, "drop_slots", chunk)])
        self._wait(
            [self._call(k, "set_slot_map", new.to_dict()) for k in range(max(num_shards, old.num_shards))]
        )
        self.slot_map = new
        if num_shards < old.num_shards:
            self._close_shards(list(range(num_shards, old.num_shards)))
        return {k: len(v) for k, v in moves.items()}

    def _forward(self, call: Call) -> Any:
        """Pass one call's result as another call's argument (Ray: the object ref, unfetched)."""
        return self._wait([call])[0]

    # ---- export ----------------------------------------------------------------------------------
    def export(self, table: str, url: str, rows_per_file: int = 1 << 22) -> str:
        """Write `table` as Parquet (id, vector) under `url`; returns the manifest path, written last."""
        spec = self._spec(table)
        self.flush()
        t0 = time.perf_counter()
        fs, root = ckpt.url_to_fs(url)
        if fs.exists(f"{root}/_MANIFEST.json"):
            raise FileExistsError(f"{url}: an export is already there; export to a fresh URL")
        files = [f for part in self._all("export", table, url, rows_per_file) for f in part]
        path = write_export_manifest(url, table, spec.dim, files)
        self._record("export", table, sum(f["rows"] for f in files), 0, time.perf_counter() - t0)
        return path

    # ---- import ----------------------------------------------------------------------------------
    def import_table(self, table: str, url: str, id_column: str = "id", vector_column: str = "vector") -> int:
        """Set rows of `table` from Parquet (an `export`, a directory of files or one file: an integer
        `id_column`, a float list `vector_column` of the table's dim); returns the rows imported.

        Imported ids are admitted if absent; their rows start with fresh optimizer state. Other
        rows are left as they are. Across files, a repeated id takes its last vector. Bad input
        raises DataError naming the file, column and row (rows read before it stay imported).
        """
        self._spec(table)
        self.flush()
        self._drop_prefetches()
        t0 = time.perf_counter()
        source = (url, id_column, vector_column)
        self._on_control("import", table, source)  # logged first: a shard lost mid-way re-imports it all
        n = self._import_rows(table, source, self._step[table])
        self._record("import", table, n, 0, time.perf_counter() - t0)
        return n

    def _import_rows(
        self, table: str, source: tuple[str, str, str], step: int, shard: int | None = None, wait: Any = None
    ) -> int:
        """Send the rows of `source` (url, id column, vector column) to their shards (only to
        `shard`, waiting with `wait`, in a recovery's replay)."""
        url, id_column, vector_column = source
        spec, n, wait = self._specs[table], 0, wait or self._wait
        for ids, rows in read_vectors(url, spec.dim, id_column, vector_column):
            calls = [
                self._call(k, "import_rows", table, ids[sel], rows[sel], step)
                for k, sel in self.slot_map.split(ids)
                if shard is None or k == shard
            ]
            n += int(sum(wait(calls)))
        return n
