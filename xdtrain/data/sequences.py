"""Time-ordered per-user, per-domain interaction sequences, in memory or with a Ray Data shuffle.

Output (one row per (user_id, domain), or per user_id with `by_domain=False`):
    user_id: int64, domain: string, items: list<int64>, timestamps: list<timestamp type>,
    and for each extra column c (default: `rating`, `label` when present) `c + "s"`: list<type of c>.

Order inside a sequence: by timestamp, ties broken by item_id, then by the extra columns in
order. This is a total order on what a row carries (rows equal on all of it are
interchangeable), so the result does not depend on input row order: the in-memory path and
the Ray path, whose shuffle loses row order, give identical sequences. Rows of the in-memory
result are sorted by (user_id, domain); the Ray path writes its rows in no particular order
across files (`read_sequences` sorts them back).

With `by_domain=False`, pass `extra_columns=["domain"]` to keep each position's domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError, check_batch, check_schema
from xdtrain.outputs import AtomicFile, StagedDir

DEFAULT_EXTRAS = ("rating", "label")


def _plan(schema: pa.Schema, extra_columns: Sequence[str] | None, by_domain: bool, where: str):
    """(keys, extras) after checking that the columns exist."""
    check_schema(schema, "interactions", where)
    keys = ["user_id", "domain"] if by_domain else ["user_id"]
    if extra_columns is None:
        extras = [c for c in DEFAULT_EXTRAS if c in schema.names]
    else:
        extras = list(extra_columns)
        missing = [c for c in extras if c not in schema.names]
        if missing:
            raise DataError(
                f"{where}: extra column(s) {missing} not found (columns: {', '.join(schema.names)})"
            )
    taken = set(keys) | {"item_id", "timestamp"}
    clash = [c for c in extras if c in taken]
    if clash:
        raise DataError(f"{where}: {clash} cannot be an extra column here (already a key or a sequence)")
    return keys, extras


def group_starts(table: pa.Table, keys: list[str]) -> np.ndarray:
    """Row indices where a new key group starts, in a table sorted by `keys`."""
    n = table.num_rows
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for k in keys:
        col = table[k]
        if n > 1:
            diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
            change[1:] |= np.asarray(pc.fill_null(diff, True).to_numpy(zero_copy_only=False), dtype=bool)
    return np.flatnonzero(change)


def _build(table: pa.Table, keys: list[str], extras: list[str], where: str) -> pa.Table:
    check_batch(table, "interactions", where)
    cols = keys + ["item_id", "timestamp"] + extras
    table = table.select(cols)
    if "domain" in table.column_names:  # dictionary or integer domains -> one plain type for both paths
        table = table.set_column(
            table.column_names.index("domain"), "domain", pc.cast(table["domain"], pa.string())
        )
    order = [(c, "ascending") for c in keys + ["timestamp", "item_id"] + extras]
    s = table.sort_by(order).combine_chunks()
    if s.num_rows >= 2**31:
        raise DataError(
            f"{where}: {s.num_rows} rows is too many for one in-memory pass; use build_sequences_ray"
        )
    starts = group_starts(s, keys)
    offsets = pa.array(np.append(starts, s.num_rows).astype(np.int32))
    out = {k: s[k].take(pa.array(starts)) for k in keys}
    out["items"] = pa.ListArray.from_arrays(offsets, s["item_id"].combine_chunks())
    out["timestamps"] = pa.ListArray.from_arrays(offsets, s["timestamp"].combine_chunks())
    for c in extras:
        out[c + "s"] = pa.ListArray.from_arrays(offsets, s[c].combine_chunks())
    return pa.table(out)


def build_sequences(
    interactions: pa.Table,
    extra_columns: Sequence[str] | None = None,
    by_domain: bool = True,
    where: str = "interactions",
) -> pa.Table:
    """In-memory path: one sort, then list columns sliced at the group boundaries."""
    keys, extras = _plan(interactions.schema, extra_columns, by_domain, where)
    return _build(interactions, keys, extras, where)


def build_sequences_ray(
    src: str,
    dst: str,
    extra_columns: Sequence[str] | None = None,
    by_domain: bool = True,
    num_partitions: int | None = None,
) -> str:
    """Scalable path: Ray Data reads Parquet at `src`, hash-shuffles rows by user_id, builds the
    sequences of each partition on a worker, and writes Parquet files under `dst`.

    This is what `groupby(...).map_groups` does (repartition by key with sorting, then one
    whole block per batch, so a key never straddles two batches), with one vectorised build
    per partition instead of a Python call per group. No process holds more than a partition.
    Output goes to a temporary folder beside `dst`, swapped in when complete (`StagedDir`).
    """
    import ray.data

    ds = ray.data.read_parquet(src)
    keys, extras = _plan(ds.schema().base_schema, extra_columns, by_domain, src)
    ds = ds.select_columns(keys + ["item_id", "timestamp"] + extras)
    n = num_partitions or ds.context.default_hash_shuffle_parallelism

    def one_partition(part: pa.Table) -> pa.Table:
        return _build(part, keys, extras, src)

    shuffled = ds.repartition(n, keys=["user_id"], sort=True)
    result = shuffled.map_batches(one_partition, batch_size=None, batch_format="pyarrow")
    with StagedDir(dst, "sequences") as stage:
        result.write_parquet(stage.fs.unstrip_protocol(stage.path))
    return dst


def read_sequences(path: str | Path, by_domain: bool = True) -> pa.Table:
    """Read a sequences file or folder (either path's output), rows sorted by (user_id, domain)."""
    table = pq.read_table(str(path))
    keys = ["user_id", "domain"] if by_domain else ["user_id"]
    return table.sort_by([(k, "ascending") for k in keys]).combine_chunks()


# ---------------------------------------------------------------- incremental fine-tuning


def first_samples(seqs: pa.Table, n_samples: int, seed: int | None = None, where: str = "n_samples") -> pa.Table:
    """The first `n_samples` next-item samples of the sequence rows (a row of n items holds n - 1).

    PreRec's incremental fine-tuning (code: `train_cut_list`): rows are taken whole, in their order
    (with `seed`: a seeded random order of the rows, like the authors' user-shuffled train split),
    and the last one is cut to its first samples so that the total is exact. Every list column of
    the cut row (items, timestamps, domains, ...) keeps the same prefix. Samples within a row stay in
    time order; the result keeps the input's row order. `n_samples == 0` keeps every row.
    """
    if n_samples < 0:
        raise DataError(f"{where}: must be >= 0 (0 = every sample), got {n_samples}")
    if "items" not in seqs.schema.names:
        raise DataError(f"sequence rows: missing column 'items' (found: {', '.join(seqs.schema.names)})")
    lengths = np.asarray(pc.fill_null(pc.list_value_length(seqs["items"]), 0), dtype=np.int64)
    order = np.arange(seqs.num_rows) if seed is None else np.random.default_rng(seed).permutation(seqs.num_rows)
    total = np.cumsum(np.maximum(lengths - 1, 0)[order])
    if n_samples == 0 or not len(total) or total[-1] <= n_samples:
        return seqs
    last = int(np.searchsorted(total, n_samples))  # the row (in `order`) that reaches n_samples
    need = n_samples - (int(total[last - 1]) if last else 0)
    cut = int(order[last])
    rows = np.sort(order[:last])
    before, after = rows[rows < cut], rows[rows > cut]
    tail = seqs.slice(cut, 1)
    for i, f in enumerate(tail.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            tail = tail.set_column(i, f, pc.list_slice(tail.column(i), 0, need + 1).cast(f.type))
    return pa.concat_tables([seqs.take(pa.array(before, pa.int64())), tail,
                             seqs.take(pa.array(after, pa.int64()))]).combine_chunks()


# ---------------------------------------------------------------- writing without half-written outputs


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int | None = None) -> None:
    """Write one Parquet file (row groups of `row_group_size` rows; None = Arrow's default) under a
    temporary name, then rename it into place."""
    with AtomicFile(path) as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def write_dataset(table: pa.Table, url: str | Path, rows_per_group: int = 1 << 20, only_file: bool = False) -> str:
    """`table` as a one-file Parquet dataset under folder `url` (row groups of `rows_per_group` rows:
    the unit the streaming reader shards by), written atomically; returns the folder. `only_file`
    (prepared data under a run's `data/`): the other `part-<n>.parquet` files there, a previous
    partitioned preparation's, are removed so that the folder is this table."""
    write_parquet(table, Path(url) / "part-00000.parquet", row_group_size=max(1, rows_per_group))
    if only_file:
        for stale in Path(url).glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"):
            if stale.name != "part-00000.parquet":
                stale.unlink()
    return str(Path(url))
