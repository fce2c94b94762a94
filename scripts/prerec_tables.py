"""The tables of docs/results/prerec.md from the runs of scripts/prerec_runs.py.

    python scripts/prerec_tables.py runs/prerec_v2 --seeds 0 1 2

Reads <exp>/<setting>_{prerec,prerec_n}_s<seed>/metrics.json (and, for the paired tests, the per-row
metrics the runs keep with eval.keep_rows) and prints Markdown: per setting, Recall@K% and r-NDCG@K%
over all test rows and each eval group (unseen, new_user, new_item: the rows flagged true), the learned
models as mean ± sample std over seeds, the non-learned baselines (the same in every run) once; then
paired comparisons on the same test rows (per seed, and per row with the seeds averaged: a paired
bootstrap 95% interval and a paired t-test). n = rows scored.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import stats

MODELS = {"prerec_n": "PreRec_n", "prerec": "PreRec"}  # run-folder prefix -> label
SCORER = "prerec"  # both variants report as model.name
BASELINES = {"random": "Random", "pop": "POP", "sbert": "SBERT"}
LABELS = {**MODELS, **BASELINES}
SETTINGS = {  # run-folder prefix -> title
    "zs": "Held-out markets zip3 + zip8, zero-shot",
    "ft": "Held-out markets zip3 + zip8, fine-tuned",
    "zs100k": "ML-100K as a new platform, zero-shot (pre-trained on ML-1M with the title twins)",
    "zs100ktf": "ML-100K as a new platform, zero-shot, twin-free pre-training (no ML-1M movie whose title ML-100K has)",
    "pre": "Source markets (the pre-training runs' own test)",
    "pretf": "Source markets, twin-free pre-training",
}
COMPARE = [("prerec", "prerec_n"), ("prerec", "sbert"), ("prerec_n", "sbert"), ("prerec", "pop")]
BOOTSTRAP = 10_000


def groups(run: Path) -> dict[str, dict[str, dict]]:
    """{scorer: {group: metrics}} of a run's full-catalogue test ("all", "unseen=true", ...)."""
    path = run / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing (run scripts/prerec_runs.py first)")
    s = json.loads(path.read_text())
    if "test_groups" in s:
        return {name: modes["full"] for name, modes in s["test_groups"].items()}
    return {name: {"all": modes["full"]} for name, modes in s["test"].items()}


def metric_names(g: dict) -> list[str]:
    """The Recall@K% and r-NDCG@K% keys (e.g. recall@1%, rndcg@1%)."""
    names = [k for k in g if k.startswith(("recall@", "rndcg@")) and k.endswith("%")]
    if not names:
        raise SystemExit("no Recall@K% / r-NDCG@K% in the runs: set eval.k_percents")
    return sorted(names, key=lambda k: (not k.startswith("recall"), k))


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def row(label: str, per_seed: list[dict[str, dict]], names: list[str], group_keys: list[str]) -> str:
    cells = []
    for g in group_keys:
        cells += [cell([r[g][m] for r in per_seed if g in r]) for m in names]
    n = " / ".join(str(per_seed[0][g]["count"]) if g in per_seed[0] else "0" for g in group_keys)
    return f"| {label} | {n} | " + " | ".join(cells) + " |"


def row_metrics(run: Path, scorer: str, names: list[str]) -> dict[str, np.ndarray] | None:
    """{metric: per-row values in row order} from <run>/test/<scorer>_full/metrics_rows.parquet."""
    path = run / "test" / f"{scorer}_full" / "metrics_rows.parquet"
    if not path.exists():
        return None
    t = pq.read_table(path, columns=["row", *names]).sort_by("row")
    return {"row": t["row"].to_numpy(), **{m: t[m].to_numpy() for m in names}}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float, float]:
    """(mean of a - b, bootstrap 95% interval low, high, two-sided paired t-test p) over rows."""
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(BOOTSTRAP)])
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if np.any(d != d[0]) else (1.0 if d[0] == 0 else 0.0)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), p


def comparisons(exp: Path, setting: str, seeds: list[int], names: list[str],
                runs: dict[str, list[dict]]) -> list[str]:
    """Paired rows: per-seed differences over all rows, then per row with the seeds averaged."""
    per_row: dict[str, dict[str, np.ndarray]] = {}
    for m in MODELS:
        kept = [row_metrics(exp / f"{setting}_{m}_s{s}", SCORER, names) for s in seeds]
        if all(k is not None for k in kept):
            if any(not np.array_equal(k["row"], kept[0]["row"]) for k in kept):
                raise SystemExit(f"{setting}: the seeds of {m} scored different test rows")
            per_row[m] = {x: np.mean([k[x] for k in kept], axis=0) for x in names}
            per_row[m]["row"] = kept[0]["row"]
    for b in BASELINES:
        k = row_metrics(exp / f"{setting}_prerec_s{seeds[0]}", b, names)
        if k is not None:
            per_row[b] = k
    out = ["| comparison | metric | per seed (all rows) | mean difference | 95% CI (paired bootstrap, rows) "
           "| p (paired t, rows) |", "|---|---|---|---|---|---|"]
    for a, b in COMPARE:
        if a not in runs or b not in runs:
            continue
        for m in names:
            xs, ys = runs[a], runs[b] * (len(seeds) if len(runs[b]) == 1 else 1)  # a baseline: one run
            seeds_txt = ", ".join(f"{x['all'][m] - y['all'][m]:+.4f}" for x, y in zip(xs, ys))
            if a in per_row and b in per_row:
                if not np.array_equal(per_row[a]["row"], per_row[b]["row"]):
                    raise SystemExit(f"{setting}: {a} and {b} scored different test rows")
                d, lo, hi, p = paired(per_row[a][m], per_row[b][m])
                stat = f"{d:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {p:.3g}"
            else:
                stat = "- | - | -"
            out.append(f"| {LABELS[a]} − {LABELS[b]} | {m} | {seeds_txt} | {stat} |")
    return out


def results_table(exp: Path, setting: str, seeds: list[int], title: str) -> list[str]:
    runs = {m: [groups(exp / f"{setting}_{m}_s{s}") for s in seeds] for m in MODELS}
    first = runs["prerec"][0]
    names = metric_names(first[SCORER]["all"])
    n_all = first[SCORER]["all"]["count"]
    flags = sorted({g.split("=")[0] for g in first[SCORER] if "=" in g})  # unseen, new_user, new_item
    count = {g: first[SCORER].get(f"{g}=true", {}).get("count", 0) for g in flags}
    # a group gets its own columns only when it is a strict, non-empty part of the rows
    group_keys = ["all"] + [f"{g}=true" for g in flags if 0 < count[g] < n_all]
    head = [f"{m} {g.split('=')[0]}" for g in group_keys for m in names]
    out = [f"### {title}", ""]
    if flags:
        out += [f"Test rows: {n_all}; " + ", ".join(f"{g.replace('_', ' ')} {count[g]}" for g in flags) + ".", ""]
    out += ["| method | n (" + " / ".join(g.split("=")[0] for g in group_keys) + ") | "
            + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    flat = {m: [r[SCORER] for r in runs[m]] for m in MODELS}
    for b, label in BASELINES.items():
        vals = [r[b] for m in MODELS for r in runs[m] if b in r]
        if vals:
            if any(v != vals[0] for v in vals):  # deterministic: every run must agree
                raise SystemExit(f"{setting}: baseline {b} differs between runs")
            out.append(row(label, vals[:1], names, group_keys))
            flat[b] = vals[:1]
    for m, label in MODELS.items():
        out.append(row(f"{label} ({len(seeds)} seeds)", flat[m], names, group_keys))
    p, n = np.mean([r["all"][names[0]] for r in flat["prerec"]]), n_all
    out += ["", *comparisons(exp, setting, seeds, names, flat), "",
            f"Binomial standard error of one {names[0]} over the {n} test rows: {math.sqrt(p * (1 - p) / n):.4f}.", ""]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", type=Path, help="the experiment folder (runs/prerec_v2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    a = ap.parse_args(argv)
    lines: list[str] = []
    for setting in a.settings:
        lines += results_table(a.exp, setting, a.seeds, SETTINGS[setting])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
