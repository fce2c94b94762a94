"""`python -m jobs.finetune --config <yaml> [key=value ...]` (also `xdtrain finetune`, and under `ray job submit`).

See xdtrain/train/engine.py (run_finetune) for what it does; outputs and metrics.json go under run_dir.
"""

from __future__ import annotations

import sys

from xdtrain.jobrunner import job_main
from xdtrain.train.config import EngineConfig
from xdtrain.train.engine import run_finetune


def main(argv: list[str] | None = None) -> int:
    return job_main("finetune", EngineConfig, run_finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
