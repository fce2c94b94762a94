"""The one way a job starts: `--config <yaml> [key=value ...]` -> typed config -> run -> metrics JSON.

`jobs/<name>.py` and the `xdtrain` CLI both call `job_main`, so a job behaves the same under
`ray job submit`, `python -m jobs.<name>` and `xdtrain <name>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from xdtrain.config import ConfigError, load_config, to_dict
from xdtrain.data.schemas import DataError
from xdtrain.outputs import JOB_ENV, owner_of, write_json_atomic

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
    summary = dict(summary or {})
    summary.setdefault("job", name)
    summary.setdefault("wall_seconds", round(time.time() - start, 3))
    summary.setdefault("config", to_dict(cfg))
    out_dir = summary.get("run_dir")
    if out_dir and owner_of(out_dir) is not None:  # never into a folder xdtrain did not create
        write_json_atomic(Path(out_dir) / "metrics.json", summary)
    elif out_dir:
        print(f"xdtrain {name}: metrics.json not written: {out_dir} is not a folder xdtrain created", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0
