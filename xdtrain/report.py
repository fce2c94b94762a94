"""Render a run directory into plots and one HTML page: `xdtrain report <run_dir>`.

Reads `<run_dir>/metrics.json` (the job's summary dict) and `<run_dir>/curves.jsonl` (one JSON
object per line: `{"kind": "train", "step", "epoch", "loss", "samples_per_s", "ps_rows_per_s",
"time_s", "workers", "attempt"}`, optionally with `"losses": {name: value}` (a model's named
losses, next to the total `loss`) and `"phase": name`; or `{"kind": "valid", "step", "epoch",
"<metric>": value, ...}`). A restarted run appends records for steps it had already logged; the
last record per (kind, step) wins. Writes `loss.png` (the named losses in a second panel, phases
shaded), `valid.png`, `throughput.png` (each only when there is something to plot), `curves.csv`
(the de-duplicated records, a `losses.<name>` column per named loss) and `report.html`, each
atomically.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from xdtrain.outputs import write_bytes_atomic, write_text_atomic

__all__ = ["ReportError", "load_curves", "main", "render_report"]

KINDS = ("train", "valid")
KEYS = ("kind", "step", "epoch")
LOSSES, PHASE = "losses", "phase"  # a train record's named losses {name: value} and its phase name
MAX_PHASE_SPANS = 60  # phases that change more often than this are not shaded (too thin to read)
TRAIN_FIELDS = ("loss", "samples_per_s", "ps_rows_per_s", "time_s", "workers", "attempt")
MAX_TABLE_ROWS = 500  # a list in metrics.json longer than this is cut in the page (the JSON has it all)


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the file (and line)."""


# --- inputs -----------------------------------------------------------------------------------------


def load_summary(path: Path) -> dict:
    """The run's summary dict from metrics.json."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (is this a run directory?)") from None
    if not text.strip():
        raise ReportError(f"{path}: empty file")
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_curves(path: str | Path) -> list[dict]:
    """The records of curves.jsonl, last one per (kind, step), sorted by kind then step.

    Blank lines and records of other kinds are skipped; anything malformed raises ReportError
    naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (the run wrote no training curves)") from None
    latest: dict[tuple[str, int], dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if rec.get("kind") not in KINDS:
            if isinstance(rec.get("kind"), str):
                continue  # a record kind this version does not plot
            raise ReportError(f"{where}: 'kind' must be one of {list(KINDS)}, got {rec.get('kind')!r}")
        for key in ("step", "epoch"):
            if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool) or rec[key] < 0:
                raise ReportError(f"{where}: '{key}' must be an integer >= 0, got {rec.get(key)!r}")
        for key, value in rec.items():
            if key == LOSSES:
                if not isinstance(value, dict) or not all(_number(v) for v in value.values()):
                    raise ReportError(f"{where}: '{LOSSES}' must map names to numbers, got {value!r}")
            elif key == PHASE:
                if not isinstance(value, str):
                    raise ReportError(f"{where}: '{PHASE}' must be a string, got {value!r}")
            elif key not in KEYS and not _number(value):
                raise ReportError(f"{where}: '{key}' must be a number, got {value!r}")
        if rec["kind"] == "train" and "loss" not in rec:
            raise ReportError(f"{where}: train record without 'loss'")
        if rec["kind"] == "valid" and len(rec) == len(KEYS):
            raise ReportError(f"{where}: valid record without any metric")
        latest[(rec["kind"], rec["step"])] = rec
    if not latest:
        raise ReportError(f"{path}: no train or valid records")
    return [latest[k] for k in sorted(latest, key=lambda k: (KINDS.index(k[0]), k[1]))]


# --- outputs ----------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _series(records: list[dict], key: str, group: str = "") -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, or of `record[group][key]` (e.g. a named loss)."""
    values = [(r["step"], r.get(group, {}) if group else r) for r in records]
    pts = [(step, float(v[key])) for step, v in values if key in v]
    return [s for s, _ in pts], [v for _, v in pts]


def named_losses(records: list[dict]) -> list[str]:
    """The named losses of the train records, in order of appearance."""
    return list(dict.fromkeys(n for r in records for n in r.get(LOSSES, {})))


def phase_spans(train: list[dict]) -> list[tuple[str, int, int]]:
    """(phase, first step, last step) of each run of consecutive records in one phase. A record
    covers the steps since the previous record, so a span starts at the step of the record before."""
    spans: list[tuple[str, int, int]] = []
    prev_step = 0
    for r in train:
        if PHASE in r:
            if spans and spans[-1][0] == r[PHASE]:
                spans[-1] = (r[PHASE], spans[-1][1], r["step"])
            else:
                spans.append((r[PHASE], prev_step, r["step"]))
        prev_step = r["step"]
    return spans


def _shade_phases(axes, train: list[dict]) -> bool:
    """Shade each phase span (one colour per phase name, labelled on the first axes); False when
    there are none, or too many to read."""
    spans = phase_spans(train)
    if not spans or len(spans) > MAX_PHASE_SPANS:
        return False
    names = list(dict.fromkeys(name for name, _, _ in spans))
    pastel = colormaps["Pastel2"]  # apart from the curves' own colours
    colours = {name: pastel(i % pastel.N) for i, name in enumerate(names)}
    for ax in axes:
        for name, lo, hi in spans:
            ax.axvspan(lo, hi, color=colours[name], alpha=0.5, linewidth=0, zorder=0)
    handles = [Patch(color=colours[n], alpha=0.5, label=f"phase {n}") for n in names]
    axes[0].legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0),
                   ncol=min(len(names), 5), frameon=False)  # above the plot: it hides no curve
    return True


def _mark_restarts(ax, train: list[dict]) -> None:
    """Dotted vertical lines where a new attempt (restart) begins."""
    for prev, cur in zip(train, train[1:]):
        if cur.get("attempt", 0) != prev.get("attempt", 0):
            ax.axvline(cur["step"], color="grey", linestyle=":", linewidth=1)


def plot_loss(train: list[dict], path: Path) -> Figure:
    """The total loss; below it, one curve per named loss when the model has them."""
    named = named_losses(train)
    fig = Figure(figsize=(7, 6.5) if named else (7, 4))
    axes = list(fig.subplots(2, 1, sharex=True)) if named else [fig.add_subplot()]
    axes[0].plot(*_series(train, "loss"), color="tab:blue", linewidth=1.2)
    axes[0].set(ylabel="training loss (total)" if named else "training loss")
    for i, name in enumerate(named):
        axes[1].plot(*_series(train, name, LOSSES), color=f"C{i % 10}", linewidth=1.2, label=name)
    if named:
        axes[1].set(ylabel="named losses")
        axes[1].legend(fontsize=8, loc="best", ncol=min(len(named), 4))
    for ax in axes:
        _mark_restarts(ax, train)
        ax.grid(alpha=0.3)
    axes[-1].set(xlabel="step")
    shaded = _shade_phases(axes, train)
    axes[0].set_title("Training loss (dotted: restarts" + ("; shaded: phases)" if shaded else ")"),
                      pad=22 if shaded else 6)
    _save(fig, path)
    return fig


def plot_valid(valid: list[dict], path: Path) -> Figure:
    metrics = list(dict.fromkeys(k for r in valid for k in r if k not in KEYS))
    # Rates (HR, NDCG, MRR, AUC, ...) share one 0-1 axis; unbounded ones such as the mean rank
    # would flatten them, so they stay in the HTML table only.
    metrics = [m for m in metrics if all(0.0 <= r.get(m, 0.0) <= 1.0 for r in valid)] or metrics
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name in metrics:
        ax.plot(*_series(valid, name), marker="o", markersize=3, label=name)
    ax.set(xlabel="step", ylabel="metric", title="Validation metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    top = ax.twiny()  # the epoch of each validation, on top of its step
    top.set_xlim(ax.get_xlim())
    ticks = valid if len(valid) <= 12 else valid[:: math.ceil(len(valid) / 12)]
    top.set_xticks([r["step"] for r in ticks], [str(r["epoch"]) for r in ticks], fontsize=8)
    top.set_xlabel("epoch")
    _save(fig, path)
    return fig


def plot_throughput(train: list[dict], path: Path) -> Figure:
    fig = Figure(figsize=(7, 6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(*_series(train, "samples_per_s"), color="tab:green", linewidth=1.2)
    ax1.set(ylabel="samples/s", title="Throughput (dotted: restarts)")
    if any("workers" in r for r in train):
        workers = ax1.twinx()  # elasticity shows up as steps in the worker count
        workers.step(*_series(train, "workers"), where="post", color="tab:grey", alpha=0.6)
        workers.set_ylabel("workers")
        workers.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.plot(*_series(train, "ps_rows_per_s"), color="tab:purple", linewidth=1.2)
    ax2.set(xlabel="step", ylabel="PS rows/s")
    for ax in (ax1, ax2):
        _mark_restarts(ax, train)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def write_csv(records: list[dict], path: Path) -> None:
    """One row per record; a named loss is the column `losses.<name>`."""
    records = [{**{k: v for k, v in r.items() if k != LOSSES},
                **{f"{LOSSES}.{n}": v for n, v in r.get(LOSSES, {}).items()}} for r in records]
    columns = list(KEYS) + list(dict.fromkeys(k for r in records for k in r if k not in KEYS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(path, buf.getvalue())


# --- HTML -------------------------------------------------------------------------------------------


def _flatten(obj: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        out += _flatten(value, f"{name}.") if isinstance(value, dict) and value else [(name, value)]
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (str, int)) or value is None:
        text = str(value)
    else:
        text = json.dumps(value, default=str)
    return html.escape(text)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_tables(summary: dict) -> list[tuple[str, str]]:
    """(title, table HTML): top-level scalars together, each nested dict flattened, lists of dicts as rows."""
    scalars = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    out = [("Summary", _table(["key", "value"], [list(kv) for kv in scalars]))] if scalars else []
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            out.append((key, _table(["key", "value"], [list(kv) for kv in _flatten(value)])))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            flat = [dict(_flatten(v)) for v in value]
            cols = list(dict.fromkeys(k for row in flat for k in row))
            rows = [[row.get(c, "") for c in cols] for row in flat[:MAX_TABLE_ROWS]]
            more = f" (first {MAX_TABLE_ROWS} of {len(flat)})" if len(flat) > MAX_TABLE_ROWS else ""
            out.append((f"{key}{more}", _table(cols, rows)))
        elif isinstance(value, list):
            out.append((key, _table(["value"], [[v] for v in value[:MAX_TABLE_ROWS]])))
    return out


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; display: block; margin-bottom: 1.5em; }
"""


def write_html(run_dir: Path, summary: dict, records: list[dict], plots: dict[str, Path], path: Path) -> None:
    train = [r for r in records if r["kind"] == "train"]
    facts = [
        ["train records", len(train)],
        ["valid records", len(records) - len(train)],
        ["last step", max(r["step"] for r in records)],
        ["attempts", len({r.get("attempt", 0) for r in train}) if train else 0],
    ]
    if named_losses(train):
        facts.append(["named losses", ", ".join(named_losses(train))])
    if phase_spans(train):
        facts.append(["phases", ", ".join(dict.fromkeys(name for name, _, _ in phase_spans(train)))])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>xdtrain report: {html.escape(run_dir.name)}"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>xdtrain report: {html.escape(str(run_dir))}</h1>",
        _table(["curves", "value"], facts),
        "<h2>Curves</h2>",
    ]
    titles = {"loss": "Training loss", "valid": "Validation metrics", "throughput": "Throughput"}
    for name, title in titles.items():
        if name in plots:
            parts.append(f"<h3>{title}</h3><img src='{html.escape(plots[name].name)}' alt='{title}'>")
        else:
            parts.append(f"<h3>{title}</h3><p>No records to plot.</p>")
    parts.append("<p>All records (last per kind and step): <a href='curves.csv'>curves.csv</a></p>")
    parts.append("<h2>Metrics (metrics.json)</h2>")
    parts += [f"<h3>{html.escape(title)}</h3>{table}" for title, table in summary_tables(summary)]
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))


def render_report(run_dir: str) -> dict[str, str]:
    """Write the plots, curves.csv and report.html into `run_dir`; returns {name: path written}."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: no such run directory")
    summary = load_summary(root / "metrics.json")
    records = load_curves(root / "curves.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    plots: dict[str, Path] = {}
    if train:
        plot_loss(train, root / "loss.png")
        plots["loss"] = root / "loss.png"
    if valid:
        plot_valid(valid, root / "valid.png")
        plots["valid"] = root / "valid.png"
    if any("samples_per_s" in r or "ps_rows_per_s" in r for r in train):
        plot_throughput(train, root / "throughput.png")
        plots["throughput"] = root / "throughput.png"
    write_csv(records, root / "curves.csv")
    write_html(root, summary, records, plots, root / "report.html")  # last: it links the others
    return {
        **{k: str(p) for k, p in plots.items()},
        "csv": str(root / "curves.csv"),
        "html": str(root / "report.html"),
    }


def main(argv: list[str] | None = None) -> int:
    """`xdtrain report <run_dir>`: render and print the paths; a bad run directory exits 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: xdtrain report <run_dir>   (writes plots, curves.csv and report.html into it)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        written = render_report(argv[0])
    except ReportError as e:
        print(f"xdtrain report: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:<11} {path}")
    print(f"report: {written['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
