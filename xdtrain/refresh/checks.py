"""The checks a refreshed version passes before it is published (spec: peace.md sec. 5.2 step 6).

    stats = table_stats(table_url, sample=1000)        # one streaming pass over the written files
    report = Report()
    check_rows(report, "user", stats, source_rows, previous_stats, cfg)
    check_finite / check_norms / check_drift / check_canary ...
    report.passed, report.failed()  -> the first failed check names itself in the job's error

Each check adds one entry {check, table, ok, detail, values}; a failed one stops the publish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.outputs import resolve
from xdtrain.ps.export import EXPORT_MANIFEST
from xdtrain.serving.reader import table_arrays
from xdtrain.serving.store import bucket_of
from xdtrain.train.config import RefreshChecks

SAMPLE_HASH = 1 << 62  # bucket_of(ids, SAMPLE_HASH): a fixed order of ids, the same in every version


class ValidationFailed(DataError):
    """A refreshed version failed a check; CURRENT was left as it was."""


@dataclass
class Report:
    entries: list[dict] = field(default_factory=list)

    def add(self, check: str, table: str, ok: bool, detail: str, **values) -> None:
        self.entries.append({"check": check, "table": table, "ok": bool(ok), "detail": detail, "values": values})

    def skip(self, check: str, table: str, why: str) -> None:
        """A check not run, in the report with its reason (it does not stop the publish)."""
        self.entries.append({"check": check, "table": table, "ok": True, "skipped": True,
                             "detail": f"skipped: {why}", "values": {}})

    @property
    def passed(self) -> bool:
        return all(e["ok"] for e in self.entries)

    def failed(self) -> list[dict]:
        return [e for e in self.entries if not e["ok"]]

    def lines(self) -> list[str]:
        return [f"  {'skip' if e.get('skipped') else 'ok  ' if e['ok'] else 'FAIL'} {e['check']:<8} {e['table']:<6} "
                f"{e['detail']}"
                for e in self.entries]


@dataclass
class TableStats:
    rows: int = 0
    nonfinite: int = 0
    norm_sum: float = 0.0
    norm_sq: float = 0.0
    norm_min: float = float("inf")
    norm_max: float = 0.0
    keys_unique: bool = True  # ids unique in the table (else keyed by id and domain)
    sample: pa.Table | None = None  # the rows of the `sample` smallest id hashes

    def norms(self) -> dict:
        n = max(self.rows - self.nonfinite, 1)
        mean = self.norm_sum / n
        return {"mean": mean, "std": float(np.sqrt(max(self.norm_sq / n - mean * mean, 0.0))),
                "min": self.norm_min if self.rows else 0.0, "max": self.norm_max}


def _files(url: str) -> tuple[object, str, list[str]]:
    fs, root = resolve(url)
    try:
        with fs.open(f"{root}/{EXPORT_MANIFEST}", "rb") as f:
            manifest = json.loads(f.read().decode())
    except FileNotFoundError:
        raise DataError(f"{root}: no {EXPORT_MANIFEST} (the table was not written whole)") from None
    return fs, root, [e["path"] for e in manifest["files"]]


def table_stats(url: str, sample: int) -> TableStats:
    """Row count, non-finite rows, norm statistics, key uniqueness and the fixed sample of a written
    table, in one pass over its bucket files (one file in memory at a time: equal ids share a bucket)."""
    fs, root, files = _files(url)
    st, best = TableStats(), None
    for name in files:
        with fs.open(f"{root}/{name}", "rb") as f:
            t = pq.read_table(f)
        ids, vecs, doms = table_arrays(t)
        st.rows += len(ids)
        bad = ~np.isfinite(vecs).all(axis=1) if len(ids) else np.zeros(0, bool)
        st.nonfinite += int(bad.sum())
        norms = np.linalg.norm(vecs[~bad].astype(np.float64), axis=1)
        if norms.size:
            st.norm_sum += float(norms.sum())
            st.norm_sq += float((norms ** 2).sum())
            st.norm_min, st.norm_max = min(st.norm_min, float(norms.min())), max(st.norm_max, float(norms.max()))
        st.keys_unique &= len(np.unique(ids)) == len(ids)
        if sample > 0 and len(ids):
            h = bucket_of(ids, SAMPLE_HASH)
            take = np.argsort(h, kind="stable")[:sample]
            part = t.take(take).append_column("_h", pa.array(h[take]))
            best = part if best is None else pa.concat_tables([best, part])
            best = best.take(pc.sort_indices(best, [("_h", "ascending")])[:sample])
    st.sample = best.drop_columns(["_h"]) if best is not None else None
    return st


def check_rows(report: Report, table: str, st: TableStats, source_rows: int, prev: TableStats | None,
               cfg: RefreshChecks) -> None:
    """Every source row has its vector, and no more than max_shrink fewer rows than the previous version."""
    report.add("rows", table, st.rows == source_rows, f"{st.rows} rows written, {source_rows} in the source",
               rows=st.rows, source=source_rows)
    if prev is not None:
        floor = int(np.ceil(prev.rows * (1 - cfg.max_shrink)))
        report.add("rows", table, st.rows >= floor,
                   f"{st.rows} rows vs {prev.rows} in the previous version (at least {floor} wanted)",
                   rows=st.rows, previous=prev.rows)


def check_finite(report: Report, table: str, st: TableStats) -> None:
    report.add("finite", table, st.nonfinite == 0, f"{st.nonfinite} rows with NaN/Inf", nonfinite=st.nonfinite)


def check_norms(report: Report, table: str, st: TableStats, prev: TableStats | None, cfg: RefreshChecks) -> None:
    n = st.norms()
    ok = n["max"] <= cfg.max_norm
    detail = f"norm mean {n['mean']:.4g} std {n['std']:.4g} min {n['min']:.4g} max {n['max']:.4g}"
    if prev is not None:
        ratio = n["mean"] / max(prev.norms()["mean"], 1e-12)
        ok &= 1 / cfg.max_norm_ratio <= ratio <= cfg.max_norm_ratio
        detail += f", {ratio:.3g}x the previous mean"
    report.add("norms", table, ok, detail + f" (max allowed {cfg.max_norm:g})", **n)


def check_drift(report: Report, table: str, st: TableStats, previous, cfg: RefreshChecks) -> None:
    """Mean cosine between this version's and the previous version's vectors of the fixed sample
    (`previous`: an EmbeddingReader of the previous version; keys it lacks are skipped)."""
    if st.sample is None or previous is None or table not in previous.tables:
        return
    ids, vecs, doms = table_arrays(st.sample)
    keyed = "domain" in previous.info["tables"][table]["keys"]
    cos, n = [], 0
    for d in (sorted(set(doms.tolist())) if keyed and doms is not None else [None]):
        sel = np.flatnonzero(doms == d) if d is not None else np.arange(len(ids))
        old, have = previous.lookup(ids[sel], table, d)  # keys new in this version are skipped
        a, b = vecs[sel][have].astype(np.float64), old[have].astype(np.float64)
        if len(a):
            denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            cos.append(((a * b).sum(axis=1) / denom).sum())
            n += len(a)
    if n == 0:
        return
    mean = float(np.sum(cos) / n)
    report.add("drift", table, mean >= cfg.min_drift_cosine,
               f"mean cosine {mean:.4f} to version {previous.version} over {n} sampled keys "
               f"(at least {cfg.min_drift_cosine:g} wanted)", cosine=mean, sample=n)


def check_canary(report: Report, published: float, model: float, metric: str, rows: int,
                 cfg: RefreshChecks) -> None:
    gap = abs(published - model)
    report.add("canary", "user", gap <= cfg.canary_tolerance,
               f"{metric} {published:.4f} from the published vectors vs {model:.4f} by the model on {rows} "
               f"held-out rows (|gap| {gap:.4f}, at most {cfg.canary_tolerance:g})",
               published=published, model=model, rows=rows)
