"""One function per user partition as a Ray Data map, with bad input raised as itself.

`partition_map(n, fn, what)` runs `fn(j)` for j in range(n), a task per partition (Ray Data
schedules them and shows progress) and yields the results as they finish. Results travel pickled:
they are this process's own task return values (counts, small tables), never files read from users.
A `DataError` raised in a task comes back as a value and is raised on the driver as itself, not as
Ray's wrapper, so a bad row is still named by file, row group and column.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator

import numpy as np

from xdtrain.data.schemas import DataError


def partition_map(n_parts: int, fn: Callable[[int], object], what: str) -> Iterator:
    """`fn(j)` for every partition j as a Ray Data map (a task per partition, progress shown); results
    come back pickled, as they finish."""
    @carry_errors({"out": b""})
    def one(row: dict) -> dict:
        return {"out": pickle.dumps(fn(int(row["j"])))}

    for r in ray_map([{"j": j} for j in range(n_parts)], one, what):
        yield pickle.loads(r["out"])


def ray_map(items: list[dict], fn: Callable, what: str, batch: bool = False) -> Iterator[dict]:
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(fn, batch_size=1) if batch else ds.map(fn)
    print(f"[xdtrain] prepare: {what} ({len(items)} task(s))", flush=True)
    for row in ds.iter_rows():
        err = row["err"][0] if isinstance(row["err"], np.ndarray) else row["err"]
        if err:
            raise pickle.loads(err)  # a task's bad-input error, as itself
        yield row


def carry_errors(empty: dict) -> Callable:
    """Decorate a task function so that its DataError comes back as a value (`err`, the result being
    `empty`): the driver then raises the error itself, not Ray's wrapper of it. Every result carries
    `err` (empty bytes when none), and a failed one has the same columns as a good one."""
    def wrap(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        def run(arg: dict) -> dict:
            try:
                out, err = fn(arg), b""
            except DataError as e:
                out, err = dict(empty), pickle.dumps(e)
            batch = isinstance(next(iter(arg.values())), np.ndarray)
            return {**out, "err": np.array([err], dtype=object) if batch else err}

        return run

    return wrap
