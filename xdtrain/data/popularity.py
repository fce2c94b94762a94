"""Popularity factors F_j (PreRec, Lin et al. WSDM'24, sec. 3.1 and supplement App. C).

For item j of domain k at prediction time t, with c_j = j's interaction count in the window
before t (never the day of t itself, so nothing leaks from the future):

    s_w = ( sum_{i in J_k} c_i^w / |J_k| )^(1/w)                     w = 1..4   (App. C)
    F_j = [ c_j / s_1, c_j / s_2, c_j / s_3, c_j / s_4 ]             (Eq. 12 is w = 2)

Dividing by power means makes F comparable across domains: scaling every count (more traffic)
or replicating the catalogue (more items) leaves F unchanged. Options (spec sec. 2.3, sec. 10):

  alignment  "interval" (paper sec. 3.1): time is cut into equal intervals of `window_days`
             days and t uses the whole previous interval; "sliding" (authors' code): the
             `window_days` days before t's day.
  normaliser "catalogue" (paper): average over the whole catalogue J_k, zero counts included;
             "nonzero" (code): average over the items with c > 0 in the window.
  widen_empty  (code) an empty window is widened back one day at a time until it is not.
  scale      "power_mean" (the above); the spec's E3 alternatives, to test that normalising
             matters: "count" (Method A) F_j = c_j in every dimension, "share" (Method B)
             F_j = c_j / sum_i c_i, the item's share of the window's traffic, in every dimension.

How it is computed, without a dense days x items tensor: interactions are streamed batch by
batch into sparse daily counts (domain, item, day) -> count. Lookups read window counts as a
difference of cumulative sums over the sorted (item, day) keys. The normalisers of every day
come from one sweep over days that keeps each item's running window count (add the day entering
the window, subtract the day leaving it) and sums c^w afresh over the items in the window.
Memory: the nonzero daily counts, one count per active item, and days x 4 normalisers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError, hash_ids

_META_KEY = b"xdtrain.popularity"


@dataclass
class PopFactorsConfig:
    window_days: int = 15  # interval / window length in days (code: past_interval = 15)
    orders: int = 4  # w = 1..orders: F has `orders` dimensions
    alignment: Literal["interval", "sliding"] = "interval"
    normaliser: Literal["catalogue", "nonzero"] = "catalogue"
    widen_empty: bool = False
    scale: Literal["power_mean", "count", "share"] = "power_mean"
    day_seconds: int = 86400  # timestamps are unix seconds; a day is one bucket

    def __post_init__(self) -> None:
        if self.window_days < 1 or self.orders < 1 or self.day_seconds < 1:
            raise ValueError("popularity: window_days, orders and day_seconds must be >= 1")
        if self.alignment not in ("interval", "sliding"):
            raise ValueError(f"popularity.alignment must be 'interval' or 'sliding', got {self.alignment!r}")
        if self.normaliser not in ("catalogue", "nonzero"):
            raise ValueError(f"popularity.normaliser must be 'catalogue' or 'nonzero', got {self.normaliser!r}")
        if self.scale not in ("power_mean", "count", "share"):
            raise ValueError(f"popularity.scale must be 'power_mean', 'count' or 'share', got {self.scale!r}")


def days_of(timestamps: np.ndarray, day_seconds: int = 86400) -> np.ndarray:
    """Day index (floor(unix seconds / day)) of int or float timestamps."""
    ts = np.asarray(timestamps)
    if np.issubdtype(ts.dtype, np.floating):
        return np.floor(ts / day_seconds).astype(np.int64)
    return np.floor_divide(ts.astype(np.int64), day_seconds)


def _aggregate(keys: tuple[np.ndarray, ...], weights: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Sum `weights` over equal key tuples; the unique tuples come back sorted (first key major)."""
    if len(weights) == 0:
        return tuple(k[:0] for k in keys), weights[:0]
    order = np.lexsort(keys[::-1])
    sk = [k[order] for k in keys]
    change = np.zeros(len(order), dtype=bool)
    change[0] = True
    for k in sk:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    return tuple(k[starts] for k in sk), np.add.reduceat(weights[order], starts)


class _Domain:
    """The daily counts of one domain, indexed for window lookups, and its per-day normalisers."""

    def __init__(self, items: np.ndarray, days: np.ndarray, counts: np.ndarray, n_catalogue: int,
                 cfg: PopFactorsConfig):
        self.cfg = cfg
        self.n_catalogue = int(n_catalogue)
        self.item_ids = np.unique(items)  # active items (count > 0 on some day), sorted
        pos = np.searchsorted(self.item_ids, items)
        self.day0 = int(days.min())
        last = int(days.max())
        # Day rows cover every query day that can see data: after last + window + 1 nothing changes.
        self.dmax = last + cfg.window_days + 1
        self.span = self.dmax - self.day0 + 2
        (kp, kd), c = _aggregate((pos, days - self.day0), counts)
        self.keys = kp * self.span + kd  # sorted: item major, day minor
        self.cum = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
        self.lo, self.hi, self.norms, self.totals = self._sweep(pos, days - self.day0, counts)

    def _sweep(self, pos: np.ndarray, rel_day: np.ndarray, counts: np.ndarray):
        """Window bounds, normalisers s_1..s_W and total counts of every day row day0..dmax (relative days)."""
        cfg, W = self.cfg, self.cfg.window_days
        order = np.argsort(rel_day, kind="stable")
        pos, rel_day, counts = pos[order], rel_day[order], counts[order]
        n_rows = self.dmax - self.day0 + 1
        day_start = np.searchsorted(rel_day, np.arange(n_rows + 1))  # entries of relative day r
        lo, hi = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int64)
        norms = np.zeros((n_rows, cfg.orders))
        totals = np.zeros(n_rows)
        running = np.zeros(len(self.item_ids), dtype=np.int64)  # c_j over the current sliding window
        last_active = -1  # latest relative day < r that has entries
        w = np.arange(1, cfg.orders + 1, dtype=np.float64)
        for r in range(n_rows):
            a = r - 1  # the day entering the window [r - W, r)
            if a >= 0:
                s, e = day_start[a], day_start[a + 1]
                np.add.at(running, pos[s:e], counts[s:e])
                if e > s:
                    last_active = a
            if r - 1 - W >= 0:  # the day leaving it
                s, e = day_start[r - 1 - W], day_start[r - W]
                np.add.at(running, pos[s:e], -counts[s:e])
            lo[r], hi[r] = r - W, r
            s, e = day_start[max(r - W, 0)], day_start[r]
            in_window = np.unique(pos[s:e])
            c = running[in_window].astype(np.float64)
            if len(c) == 0 and cfg.widen_empty and last_active >= 0:  # code: widen back to the last active day
                lo[r] = last_active
                s, e = day_start[last_active], day_start[last_active + 1]
                _, c = _aggregate((pos[s:e],), counts[s:e].astype(np.float64))
            totals[r] = c.sum()
            if len(c):
                denom = self.n_catalogue if cfg.normaliser == "catalogue" else len(c)
                norms[r] = (np.power(c[:, None], w[None, :]).sum(0) / denom) ** (1.0 / w)
        return lo, hi, norms, totals

    def _cum_before(self, p: np.ndarray, rel: np.ndarray) -> np.ndarray:
        """Interactions of active item positions p on relative days < rel."""
        rel = np.clip(rel, 0, self.span - 1)
        return self.cum[np.searchsorted(self.keys, p * self.span + rel, side="left")]

    def rows(self, days: np.ndarray) -> np.ndarray:
        """Day row of each query day (-1: before any data)."""
        d = np.asarray(days, dtype=np.int64)
        if self.cfg.alignment == "interval":  # the interval containing d starts at floor(d / W) * W
            d = np.floor_divide(d, self.cfg.window_days) * self.cfg.window_days
        r = np.minimum(d, self.dmax) - self.day0
        return np.where(r < 0, -1, r)

    def counts(self, items: np.ndarray, days: np.ndarray) -> np.ndarray:
        items, days = np.broadcast_arrays(np.asarray(items, dtype=np.int64), np.asarray(days, dtype=np.int64))
        r = self.rows(days)
        p = np.searchsorted(self.item_ids, items).clip(max=max(len(self.item_ids) - 1, 0))
        known = (self.item_ids[p] == items) & (r >= 0) if len(self.item_ids) else np.zeros(items.shape, bool)
        rr = np.maximum(r, 0)
        c = self._cum_before(p, self.hi[rr]) - self._cum_before(p, self.lo[rr])
        return np.where(known, c, 0)

    def norms_at(self, days: np.ndarray) -> np.ndarray:
        r = self.rows(days)
        return np.where((r >= 0)[..., None], self.norms[np.maximum(r, 0)], 0.0)

    def totals_at(self, days: np.ndarray) -> np.ndarray:
        r = self.rows(days)
        return np.where(r >= 0, self.totals[np.maximum(r, 0)], 0.0)


class PopularityIndex:
    """Popularity factors of any (domain, item, day); built by streaming interactions.

    `catalogue_sizes[domain]` = |J_k| for the paper's normaliser (default: the number of items
    seen in the domain's interactions; pass the catalogue sizes whenever some items have no
    interactions). Only rows with label > 0 count when a `label` column is present.
    """

    def __init__(self, daily: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], cfg: PopFactorsConfig,
                 catalogue_sizes: dict[str, int] | None = None):
        self.cfg = cfg
        self.catalogue_sizes = {}
        self._daily = daily
        self._domains: dict[str, _Domain] = {}
        for d, (items, days, counts) in daily.items():
            n_seen = len(np.unique(items))
            n_cat = int((catalogue_sizes or {}).get(d, n_seen))
            if n_cat < n_seen:
                raise DataError(f"popularity: domain '{d}' has {n_seen} items with interactions but "
                                f"catalogue size {n_cat}")
            self.catalogue_sizes[d] = n_cat
            self._domains[d] = _Domain(items, days, counts, n_cat, cfg)

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, batches: Iterable[pa.RecordBatch | pa.Table], cfg: PopFactorsConfig | None = None,
              catalogue_sizes: dict[str, int] | None = None, where: str = "interactions") -> PopularityIndex:
        """Stream record batches (domain, item_id, timestamp[, label]) into daily counts."""
        cfg = cfg or PopFactorsConfig()
        parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        offset = 0
        for batch in batches:
            _check_batch(batch, f"{where} (rows from {offset})")
            offset += batch.num_rows
            if "label" in batch.schema.names:
                batch = batch.filter(pc.greater(batch.column("label"), 0))
            if batch.num_rows == 0:
                continue
            dom = np.asarray(pc.cast(batch.column("domain"), pa.string()).to_numpy(zero_copy_only=False))
            items = hash_ids(batch.column("item_id"))
            days = days_of(batch.column("timestamp").to_numpy(zero_copy_only=False), cfg.day_seconds)
            for d in np.unique(dom):
                sel = dom == d
                (it, dy), c = _aggregate((items[sel], days[sel]), np.ones(int(sel.sum()), dtype=np.int64))
                parts.setdefault(str(d), []).append((it, dy, c))
        if not parts:
            raise DataError(f"{where}: no interactions to count popularity from")
        daily = {}
        for d, chunks in parts.items():
            keys, c = _aggregate((np.concatenate([x[0] for x in chunks]), np.concatenate([x[1] for x in chunks])),
                                 np.concatenate([x[2] for x in chunks]))
            daily[d] = (keys[0], keys[1], c)
        return cls(daily, cfg, catalogue_sizes)

    @classmethod
    def from_table(cls, table: pa.Table, cfg: PopFactorsConfig | None = None,
                   catalogue_sizes: dict[str, int] | None = None, where: str = "interactions",
                   batch_rows: int = 1 << 20) -> PopularityIndex:
        return cls.build(table.to_batches(max_chunksize=batch_rows), cfg, catalogue_sizes, where)

    @classmethod
    def from_parquet(cls, url: str, cfg: PopFactorsConfig | None = None,
                     catalogue_sizes: dict[str, int] | None = None,
                     storage_options: dict | None = None) -> PopularityIndex:
        """Stream an interactions dataset at any fsspec URL, one row group at a time."""
        from xdtrain.data.validate import open_dataset, read_unit

        probe = open_dataset(url, "interactions", storage_options=storage_options)
        cols = ["domain", "item_id", "timestamp"] + (["label"] if "label" in probe.schema.names else [])
        ds = open_dataset(url, "interactions", columns=cols, storage_options=storage_options)
        handles: dict = {}
        return cls.build((read_unit(ds, u, handles) for u in ds.units), cfg, catalogue_sizes, url)

    # ------------------------------------------------------------ lookups

    @property
    def domains(self) -> list[str]:
        return sorted(self._domains)

    def _dom(self, domain: str) -> _Domain | None:
        return self._domains.get(str(domain))

    def counts(self, domain: str, items: np.ndarray, days: np.ndarray) -> np.ndarray:
        """c_j: interactions of `items` in the window before each day (broadcast shapes); 0 if unknown."""
        dm = self._dom(domain)
        shape = np.broadcast_shapes(np.shape(items), np.shape(days))
        return np.zeros(shape, np.int64) if dm is None else dm.counts(items, days)

    def norms(self, domain: str, days: np.ndarray) -> np.ndarray:
        """[..., orders] power means s_1..s_W of the window before each day (0 when empty)."""
        dm = self._dom(domain)
        if dm is None:
            return np.zeros((*np.shape(days), self.cfg.orders))
        return dm.norms_at(days)

    def totals(self, domain: str, days: np.ndarray) -> np.ndarray:
        """sum_i c_i: every interaction of the domain in the window before each day."""
        dm = self._dom(domain)
        return np.zeros(np.shape(days)) if dm is None else dm.totals_at(days)

    def factors(self, domain: str, items: np.ndarray, days: np.ndarray) -> np.ndarray:
        """F [..., orders] float32 for items at days (broadcast); all zero for an empty window."""
        items, days = np.broadcast_arrays(np.asarray(items, dtype=np.int64), np.asarray(days, dtype=np.int64))
        c = self.counts(domain, items, days).astype(np.float64)[..., None]
        if self.cfg.scale == "count":
            return np.repeat(c, self.cfg.orders, axis=-1).astype(np.float32)
        if self.cfg.scale == "share":
            s = np.repeat(self.totals(domain, days)[..., None], self.cfg.orders, axis=-1)
            return np.where(s > 0, c / np.where(s > 0, s, 1.0), 0.0).astype(np.float32)
        s = self.norms(domain, days)
        return np.where(s > 0, c / np.where(s > 0, s, 1.0), 0.0).astype(np.float32)

    # ------------------------------------------------------------ persistence

    def daily_counts(self) -> pa.Table:
        """The sparse daily counts: (domain, item_id, day, count), one row per nonzero (item, day)."""
        doms, cols = [], {"item_id": [], "day": [], "count": []}
        for d in sorted(self._daily):
            it, dy, c = self._daily[d]
            doms.append(np.full(len(it), d, dtype=object))
            cols["item_id"].append(it)
            cols["day"].append(dy)
            cols["count"].append(c)
        return pa.table({"domain": pa.array(np.concatenate(doms), pa.string()),
                         **{k: pa.array(np.concatenate(v), pa.int64()) for k, v in cols.items()}})

    def save(self, path: str | Path) -> None:
        """Daily counts + config + catalogue sizes in one Parquet file (written atomically)."""
        import json

        from xdtrain.data.sequences import write_parquet

        meta = {"config": asdict(self.cfg), "catalogue_sizes": self.catalogue_sizes}
        table = self.daily_counts()
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        write_parquet(table, path)

    @classmethod
    def load(cls, path: str | Path, cfg: PopFactorsConfig | None = None) -> PopularityIndex:
        """Read a saved index; `cfg` may change the factor options (the counts do not depend on them)."""
        import json

        table = pq.read_table(str(path))
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise DataError(f"{path}: not a popularity file (no {_META_KEY.decode()} metadata)")
        meta = json.loads(raw)
        cfg = cfg or PopFactorsConfig(**meta["config"])
        dom = np.asarray(table.column("domain").to_numpy(zero_copy_only=False), dtype=object)
        cols = {k: np.asarray(table.column(k).to_numpy(), dtype=np.int64) for k in ("item_id", "day", "count")}
        daily = {str(d): (cols["item_id"][dom == d], cols["day"][dom == d], cols["count"][dom == d])
                 for d in np.unique(dom)}
        return cls(daily, cfg, meta["catalogue_sizes"])


def _check_batch(batch: pa.RecordBatch | pa.Table, where: str) -> None:
    for col in ("domain", "item_id", "timestamp"):
        if col not in batch.schema.names:
            raise DataError(f"{where}: missing column '{col}' (found: {', '.join(batch.schema.names)})")
        arr = batch.column(col)
        if arr.null_count:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise DataError(f"{where}: column '{col}' has {arr.null_count} null value(s) (first at row {first})")
    t = batch.schema.field("timestamp").type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DataError(f"{where}: column 'timestamp' has type {t}, expected unix seconds (int or float)")


class WindowPopularityScorer:
    """PreRec's windowed POP baseline as an evaluator Scorer: the window count before the row's day
    (eval rows need a `timestamp` column; paper App. B: "the last 15 days"). The plain POP of every
    results table (train counts) is `xdtrain.eval.baselines.PopularityScorer`."""

    def __init__(self, index: PopularityIndex, timestamp_column: str = "timestamp"):
        self.index, self.col = index, timestamp_column

    def __call__(self, users: dict, items, *, domain: str):
        import torch

        days = days_of(users[self.col].cpu().numpy(), self.index.cfg.day_seconds)
        it = items.cpu().numpy()
        grid = it[None, :] if it.ndim == 1 else it
        c = self.index.counts(domain, grid, days[:, None])
        return torch.as_tensor(c, dtype=torch.float64)
