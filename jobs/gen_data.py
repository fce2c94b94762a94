"""Generate a synthetic multi-domain world with planted ground truth.

    python -m jobs.gen_data --config configs/world_small.yaml out=data/worlds/small [key=value ...]
"""

from __future__ import annotations

import sys

from xdtrain.data.synthetic import WorldConfig, run_gen_data
from xdtrain.jobrunner import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("gen-data", WorldConfig, run_gen_data, argv)


if __name__ == "__main__":
    sys.exit(main())
