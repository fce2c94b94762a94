"""The one way a job starts: `--config <yaml> [key=value ...]` -> typed config -> run -> metrics JSON.

`jobs/<name>.py` and the `xdtrain` CLI both call `job_main`, so a job behaves the same under
`ray job submit`, `python -m jobs.<name>` and `xdtrain <name>`. The job's summary is written to
`<run_dir>/metrics.json`; the console gets a compact table of it (`results_table`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from xdtrain.config import ConfigError, load_config, to_dict
from xdtrain.data.schemas import DataError
from xdtrain.outputs import JOB_ENV, disk_full, owner_of, write_json_atomic

C = TypeVar("C")


def parse_job_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"xdtrain {name}", description=f"xdtrain job: {name}")
    parser.add_argument("--config", help="YAML config file (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01")
    return parser.parse_args(argv)


def job_main(name: str, config_cls: type[C], run: Callable[[C], dict], argv: list[str] | None = None) -> int:
    """Parse args, load the config, run, and turn known input errors into one clear line (exit 2)."""
    args = parse_job_args(name, argv)
    os.environ[JOB_ENV] = name  # recorded in the ownership marker of the folders the job creates
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"xdtrain {name}: config error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    try:
        summary = run(cfg)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"xdtrain {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = disk_full(e, getattr(cfg, "run_dir", ""))
        if full is None:
            raise
        print(f"xdtrain {name}: disk full: {full}", file=sys.stderr)  # no traceback: the line says it all
        return 1
    summary = dict(summary or {})
    summary.setdefault("job", name)
    summary.setdefault("wall_seconds", round(time.time() - start, 3))
    summary.setdefault("config", to_dict(cfg))
    out_dir = summary.get("run_dir")
    if out_dir and owner_of(out_dir) is not None:  # never into a folder xdtrain did not create
        write_json_atomic(Path(out_dir) / "metrics.json", summary)
        summary["metrics"] = str(Path(out_dir) / "metrics.json")
        print(f"\nxdtrain {name}: done in {summary['wall_seconds']} s\n{results_table(summary)}")
    else:  # nowhere to keep the summary: print all of it
        if out_dir:
            print(f"xdtrain {name}: metrics.json not written: {out_dir} is not a folder xdtrain created",
                  file=sys.stderr)
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- the console's view of a summary

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any, rate: bool = False) -> str:
    """Rates (a column within [0, 1]) to 4 decimals, so they line up; other floats to 4 digits."""
    if isinstance(v, float):
        return f"{v:.4f}" if rate else f"{v:.4g}"
    return str(v)


def _metric_rows(obj: Any, label: str = "") -> list[tuple[str, dict]] | None:
    """{a: {b: {metric: number}}} -> [("a b", {metric: number}), ...]; None when not of that shape."""
    if isinstance(obj, dict) and obj and all(_is_number(v) for v in obj.values()):
        return [(label, obj)]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, dict) for v in obj.values()):
        return None
    rows: list[tuple[str, dict]] = []
    for key, value in obj.items():
        sub = _metric_rows(value, f"{label} {key}".strip())
        if sub is None:
            return None
        rows += sub
    return rows


def _wrap(pairs: list[str], indent: str = "  ", width: int = 100) -> list[str]:
    lines, line = [], ""
    for p in pairs:
        if line and len(indent) + len(line) + 2 + len(p) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line}  {p}" if line else p
    return lines + ([indent + line] if line else [])


def results_table(summary: dict, skip: tuple[str, ...] = ("job", "wall_seconds", "config")) -> str:
    """A compact view of a job summary: its scalars, one aligned table per dict of metric dicts
    (e.g. `test`: scorer x candidate mode x metric), one line per flat dict of numbers, and the
    paths last. Lists and other nested values are left to metrics.json."""
    scalars, paths, blocks = [], [], []
    for key, value in summary.items():
        if key in skip:
            continue
        if isinstance(value, str) and ("/" in value or key in ("run_dir", "metrics")):
            paths.append((key, value))
        elif _is_number(value) or isinstance(value, (bool, str)):
            scalars.append(f"{key} {_fmt(value)}")
        elif (rows := _metric_rows(value)) is not None:
            blocks.append(_metric_block(key, rows))
    out = _wrap(scalars) + [line for block in blocks for line in block]
    width = max((len(k) for k, _ in paths), default=0)
    return "\n".join(out + [f"  {k:<{width}}  {v}" for k, v in paths])


def _metric_block(key: str, rows: list[tuple[str, dict]]) -> list[str]:
    if len(rows) == 1:  # one flat dict: a line (wrapped) of name value pairs
        return _wrap([f"{key}:"] + [f"{m} {_fmt(v)}" for m, v in rows[0][1].items()])
    names = list(dict.fromkeys(m for _, r in rows for m in r))
    rate = {m: all(0 <= r.get(m, 0) <= 1 for _, r in rows) for m in names}
    cells = [[label] + [_fmt(r[m], rate[m]) if m in r else "" for m in names] for label, r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip([key] + names, *cells)]
    lines = []
    for row in [[key] + names] + cells:
        lines.append("  " + "  ".join(f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}"
                                      for i, c in enumerate(row)))
    return lines
