"""`python -m jobs.refresh_embeddings --config <pretrain yaml> checkpoint=<dir> out=<url> [key=value ...]`
(also `xdtrain refresh-embeddings`, and under `ray job submit`).

See xdtrain/refresh/job.py (run_refresh): computes, checks and publishes one embedding version.
"""

from __future__ import annotations

import sys

from xdtrain.jobrunner import job_main
from xdtrain.refresh.job import run_refresh
from xdtrain.train.config import RefreshConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("refresh-embeddings", RefreshConfig, run_refresh, argv)


if __name__ == "__main__":
    sys.exit(main())
