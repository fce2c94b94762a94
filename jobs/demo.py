"""The main demo job (`make demo`): synthetic world -> SASRec -> comparison with popularity.

    python -m jobs.demo [--config FILE] [key=value ...]
"""

from __future__ import annotations

import sys

from xdtrain.demo import DemoConfig, run_demo
from xdtrain.jobrunner import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("demo", DemoConfig, run_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
