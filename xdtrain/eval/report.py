"""The result of an evaluation: per-group metric sums that merge across shards, and its reports.

An `EvalResult` holds, for every (scope, group), the sum of each per-row metric and the row
count. scope is a domain name or "all" (rows of every domain pooled); group is "all" or
"<column>=<value>" (e.g. "overlap=true"). Sums and counts add, so results computed on shards of
the users merge into the result of a single pass (`merge_results`). Means are taken at the end:

    overall[group]      pooled mean over the rows of all domains
    domains[d][group]   mean over the rows of domain d
    domain_mean[group]  unweighted mean of the per-domain means (PreRec's multi-domain average)

`write_report` writes the summary as metrics JSON plus a markdown table, atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xdtrain.outputs import AtomicFile, write_text_atomic

ALL = "all"


def group_label(column: str, value: Any) -> str:
    """'<column>=<value>', with bools as true/false and nulls as null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "null"
    elif isinstance(value, (bool, np.bool_)):
        text = "true" if value else "false"
    else:
        text = str(value)
    return f"{column}={text}"


@dataclass
class EvalResult:
    sums: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    row_parts: list[dict[str, np.ndarray]] = field(default_factory=list)  # per-row metrics, if kept

    def add(
        self,
        domain: str,
        labels: dict[str, np.ndarray],
        values: dict[str, np.ndarray],
        rows: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Add a batch of rows of one domain: `labels[col]` holds each row's group label,
        `values[metric]` each row's metric value (float64 arrays of equal length)."""
        n = len(next(iter(values.values())))
        selections: list[tuple[str, np.ndarray | None]] = [(ALL, None)]
        for labs in labels.values():
            for lab in sorted(set(labs.tolist())):
                selections.append((lab, labs == lab))
        for scope in (domain, ALL):
            for group, sel in selections:
                key = (scope, group)
                acc = self.sums.setdefault(key, {})
                for name, v in values.items():
                    acc[name] = acc.get(name, 0.0) + float(v.sum() if sel is None else v[sel].sum())
                self.counts[key] = self.counts.get(key, 0) + (n if sel is None else int(sel.sum()))
        if rows is not None:
            self.row_parts.append({**rows, **values})

    def rows(self) -> pa.Table | None:
        """Per-row metrics (row, user_id, domain, metrics...) sorted by row, if they were kept."""
        if not self.row_parts:
            return None
        cols = {k: np.concatenate([p[k] for p in self.row_parts]) for k in self.row_parts[0]}
        order = np.argsort(cols["row"], kind="stable")
        return pa.table({k: v[order] for k, v in cols.items()})

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for acc in self.sums.values():
            names += [m for m in acc if m not in names]
        return names

    def summary(self) -> dict:
        """JSON-ready means: {info, metrics, overall, domain_mean, domains}; each group carries 'count'."""

        def means(key: tuple[str, str]) -> dict[str, float]:
            n = self.counts[key]
            return {"count": n, **{m: s / n for m, s in self.sums[key].items()}}

        domains = sorted({s for s, _ in self.counts if s != ALL})
        per_domain = {d: {g: means((d, g)) for s, g in self._ordered_keys() if s == d} for d in domains}
        overall = {g: means((ALL, g)) for s, g in self._ordered_keys() if s == ALL}
        domain_mean: dict[str, dict[str, float]] = {}
        for g in overall:
            present = [per_domain[d][g] for d in domains if g in per_domain[d]]
            domain_mean[g] = {"domains": len(present)}
            for m in self.metric_names():
                vals = [p[m] for p in present if m in p]
                domain_mean[g][m] = sum(vals) / len(vals)
        return {
            "info": self.info,
            "metrics": self.metric_names(),
            "overall": overall,
            "domain_mean": domain_mean,
            "domains": per_domain,
        }

    def _ordered_keys(self) -> list[tuple[str, str]]:
        return sorted(self.counts, key=lambda k: (k[0] != ALL, k[0], k[1] != ALL, k[1]))


def merge_results(results: list[EvalResult]) -> EvalResult:
    """Sum shard results; they must come from the same evaluation (equal `info`)."""
    if not results:
        raise ValueError("no results to merge")
    out = EvalResult(info=results[0].info)
    for r in results:
        if r.info != out.info:
            raise ValueError(f"cannot merge results of different evaluations: {r.info} vs {out.info}")
        for key, acc in r.sums.items():
            tgt = out.sums.setdefault(key, {})
            for m, v in acc.items():
                tgt[m] = tgt.get(m, 0.0) + v
        for key, n in r.counts.items():
            out.counts[key] = out.counts.get(key, 0) + n
        out.row_parts += r.row_parts
    return out


def to_markdown(summary: dict, metrics: list[str] | None = None, digits: int = 4) -> str:
    """A readable table: one line per (scope, group), one column per metric."""
    metrics = metrics or summary["metrics"]
    head = ["scope", "group", "rows", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def line(scope: str, group: str, vals: dict, count: str) -> str:
        cells = [f"{vals[m]:.{digits}f}" if m in vals else "" for m in metrics]
        return "| " + " | ".join([scope, group, count, *cells]) + " |"

    for g, vals in summary["overall"].items():
        lines.append(line(ALL, g, vals, str(vals["count"])))
    for d, groups in summary["domains"].items():
        for g, vals in groups.items():
            lines.append(line(d, g, vals, str(vals["count"])))
    for g, vals in summary["domain_mean"].items():
        lines.append(line("domain mean", g, vals, f"{vals['domains']} domains"))
    info = summary.get("info", {})
    notes = [f"{k}: {info[k]}" for k in ("candidates", "tie_policy") if k in info]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_report(result: EvalResult, out_dir: str, stem: str = "metrics") -> dict[str, str]:
    """Write <out_dir>/<stem>.json and <stem>.md (and <stem>_rows.parquet if per-row metrics were
    kept), each to a temporary name first. Returns the paths written."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    summary = result.summary()
    paths = {"json": f"{root}/{stem}.json", "markdown": f"{root}/{stem}.md"}
    write_text_atomic(paths["json"], json.dumps(summary, indent=2, sort_keys=False, default=str), fs)
    write_text_atomic(paths["markdown"], to_markdown(summary), fs)
    rows = result.rows()
    if rows is not None:
        paths["rows"] = f"{root}/{stem}_rows.parquet"
        with AtomicFile(paths["rows"], fs) as f:
            pq.write_table(rows, f)
    return paths
