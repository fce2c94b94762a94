"""Train a backbone single-process with a local item table: the correctness and speed baseline.

    python -m jobs.train_reference --config configs/ml1m_sasrec.yaml [key=value ...]

Writes `best.safetensors` and `metrics.json` (valid/test HR@K, NDCG@K, samples/s, history) under run_dir.
"""

from __future__ import annotations

import sys

from xdtrain.jobrunner import job_main
from xdtrain.reference.trainer import ReferenceConfig, run_reference


def main(argv: list[str] | None = None) -> int:
    return job_main("train-reference", ReferenceConfig, run_reference, argv)


if __name__ == "__main__":
    sys.exit(main())
