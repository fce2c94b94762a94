"""`python -m jobs.evaluate --config <yaml> [key=value ...]` (also `xdtrain evaluate`, and under `ray job submit`).

See xdtrain/train/engine.py (run_evaluate) for what it does; outputs and metrics.json go under run_dir.
"""

from __future__ import annotations

import sys

from xdtrain.jobrunner import job_main
from xdtrain.train.config import EngineConfig
from xdtrain.train.engine import run_evaluate


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", EngineConfig, run_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
