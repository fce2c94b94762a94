"""The tables of docs/results/prerec.md from the metrics.json files its commands write.

    python scripts/prerec_tables.py runs/prerec_pct --seeds 0 1 2

Reads <exp>/{pre,zs,ft,zs100k}_{prerec,prerec_n}_s<seed>/metrics.json and prints markdown rows of
Recall@K% and r-NDCG@K% over all test rows and the `unseen=true` rows: the learned models as the mean
± sample std over seeds, the non-learned baselines (the same in every run) once. n = rows scored.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

MODELS = {"prerec_n": "PreRec_n", "prerec": "PreRec"}  # run-folder prefix -> label
SCORER = "prerec"  # both variants report as model.name
BASELINES = {"random": "Random", "pop": "POP", "sbert": "SBERT"}


def groups(run: Path) -> dict[str, dict[str, dict]]:
    """{scorer: {group: metrics}} of a run's full-catalogue test ("all", "unseen=true", ...)."""
    path = run / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing (run the commands of docs/results/prerec.md first)")
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
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def row(label: str, per_seed: list[dict[str, dict]], names: list[str], group_keys: list[str]) -> str:
    cells = []
    for g in group_keys:
        present = [r[g] for r in per_seed if g in r]
        cells += [cell([r[m] for r in present]) if present else "-" for m in names]
    n = "/".join(str(per_seed[0][g]["count"]) if g in per_seed[0] else "0" for g in group_keys)
    return f"| {label} | {n} | " + " | ".join(cells) + " |"


def results_table(exp: Path, setting: str, seeds: list[int], title: str, baselines: bool = True) -> list[str]:
    runs = {m: [groups(exp / f"{setting}_{m}_s{s}") for s in seeds] for m in MODELS}
    first = runs["prerec"][0]
    names = metric_names(first[SCORER]["all"])
    group_keys = ["all"] + (["unseen=true"] if any("unseen=true" in g or "unseen=false" in g
                                                   for g in first[SCORER]) else [])
    head = [f"{m} {g.split('=')[0]}" for g in group_keys for m in names]
    out = [f"### {title}", "", "| method | n (" + " / ".join(g.split("=")[0] for g in group_keys) + ") | "
           + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    if baselines:
        for b, label in BASELINES.items():
            vals = [r[b] for m in MODELS for r in runs[m] if b in r]
            if vals:
                if any(v != vals[0] for v in vals):  # deterministic: every run must agree
                    raise SystemExit(f"{setting}: baseline {b} differs between runs")
                out.append(row(label, vals[:1], names, group_keys))
    for m, label in MODELS.items():
        out.append(row(f"{label} ({len(seeds)} seeds)", [r[SCORER] for r in runs[m]], names, group_keys))
    p, n = np.mean([r[SCORER]["all"][names[0]] for r in runs["prerec"]]), first[SCORER]["all"]["count"]
    out.append("")
    for key in names:  # paired by seed: the same test rows, PreRec and PreRec_n of the same train.seed
        diffs = [a[SCORER]["all"][key] - b[SCORER]["all"][key] for a, b in zip(runs["prerec"], runs["prerec_n"])]
        out.append(f"PreRec - PreRec_n, {key} (all), per seed: {', '.join(f'{d:+.4f}' for d in diffs)}  ")
    out += [f"binomial standard error of one {names[0]} over the {n} test rows: {math.sqrt(p * (1 - p) / n):.4f}",
            ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", type=Path, help="the experiment folder (runs/prerec_pct)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    lines = results_table(a.exp, "zs", a.seeds, "held-out markets zip3 + zip8, zero-shot")
    lines += results_table(a.exp, "ft", a.seeds, "held-out markets zip3 + zip8, fine-tuned")
    lines += results_table(a.exp, "zs100k", a.seeds, "ML-100K as a new platform, zero-shot")
    lines += results_table(a.exp, "pre", a.seeds, "source markets (the pre-training runs' own test)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
