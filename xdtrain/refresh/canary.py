"""The canary check of a refresh (spec: peace.md sec. 5.2 step 6): `canary_metric` of held-out test
rows ranked on the full catalogue from the version's written vectors, against the model's own.

    held, why = canary_rows(cfg, test)      # why != "": the canary is skipped, and the report says so
    published, own, n = run_canary(cfg, out, version, test, held, (model, ps))

The published user vectors must be of the held-out rows' own histories. Without `users=` they are
(the job embeds the test split's rows). With `users=<url>` only the held-out rows whose user (and
domain, where the file has one) has the very same history in that file qualify.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.config import ConfigError
from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.exported import export_scorer
from xdtrain.ps.export import read_export
from xdtrain.refresh.checks import SAMPLE_HASH
from xdtrain.refresh.infer import parquet_batches
from xdtrain.serving import store
from xdtrain.train.config import RefreshConfig
from xdtrain.train.evaluation import RankingEval


def canary_rows(cfg: RefreshConfig, test: EvalSet) -> tuple[pa.Table, str]:
    """(held-out rows the canary may rank, why it is skipped: "" when it runs)."""
    rows = test.rows
    if cfg.checks.canary_rows <= 0:
        return rows.slice(0, 0), "checks.canary_rows=0"
    if not cfg.users:
        return rows, ""
    held = rows_with_history_in(rows, cfg.users, test.history_column, cfg.batch_size)
    if held.num_rows == 0:
        return held, (f"none of the {rows.num_rows} held-out test rows has its user with the same history in "
                      f"users={cfg.users}, so no published user vector is of a held-out row's history")
    return held, ""


def rows_with_history_in(rows: pa.Table, users: str, history: str, batch_size: int) -> pa.Table:
    """The rows whose (user_id[, domain]) has exactly their `history` in the `users` Parquet (keys the
    file gives twice are ambiguous and left out). One pass over the file, keeping only these users."""
    want = pc.unique(rows.column("user_id"))
    found: dict[tuple, list | None] = {}
    for part in parquet_batches(users, batch_size):
        if "history" not in part.column_names:
            raise ConfigError(f"users={users}: no 'history' column (has {part.column_names})")
        part = part.filter(pc.is_in(part.column("user_id"), want))
        doms = part.column("domain").to_pylist() if "domain" in part.column_names else [None] * part.num_rows
        for key in zip(part.column("user_id").to_pylist(), doms, part.column("history").to_pylist()):
            found[key[:2]] = None if key[:2] in found else key[2]
    doms = rows.column("domain").to_pylist() if "domain" in rows.column_names else [None] * rows.num_rows
    keep = []
    for i, (u, d, h) in enumerate(zip(rows.column("user_id").to_pylist(), doms, rows.column(history).to_pylist())):
        got = found.get((u, d), found.get((u, None)))
        if got is not None and list(got) == list(h):
            keep.append(i)
    return rows.take(pa.array(keep, pa.int64()))


def run_canary(cfg: RefreshConfig, out: str, version: str, test: EvalSet, held: pa.Table,
               loaded) -> tuple[float, float, int]:
    """`canary_metric` over a fixed slice of `held` (smallest user-id hashes), ranked on the full
    catalogue from the version's written vectors and by the model itself (`loaded`: model, PS)."""
    uid = np.asarray(held.column("user_id").to_numpy(), dtype=np.int64)
    take = np.sort(np.argsort(store.bucket_of(uid, SAMPLE_HASH), kind="stable")[: cfg.checks.canary_rows])
    ev_set = EvalSet(held.take(take), test.catalogue, test.item_counts, name="canary rows",
                     history_column=test.history_column)
    metric = cfg.checks.canary_metric
    try:
        k = int(metric.split("@")[1])
    except (IndexError, ValueError):
        raise ConfigError(f"checks.canary_metric {metric!r}: want <metric>@<k>, e.g. ndcg@10") from None
    ev = RankingEval(ev_set, replace(cfg.eval, candidates=["full"], ks=[k], groups=[]))
    model, ps = loaded
    key = f"full/{metric}"
    own = ev.flat(model.scorer(ev_set.rows, ps.pull))
    if key not in own:
        raise ConfigError(f"checks.canary_metric {metric!r}: not among {sorted(own)}")
    users = read_export(store.table_dir(out, version, "user"))
    users = users.filter(pc.is_in(users.column("id"), pa.array(uid[take])))
    items = read_export(store.table_dir(out, version, "item"))
    published = ev.flat(export_scorer(users, items))[key]
    return published, own[key], len(take)
