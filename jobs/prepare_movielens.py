"""`python -m jobs.prepare_movielens --config configs/data_ml1m.yaml [key=value ...]`

Converts the shipped MovieLens (and Freebase KG) atomic files into canonical Parquet under
`out_dir`: interactions, items, users, sequences (+ triplets, links, entities, relations for
`ml-100k-kg`; item_matches for `ml-1m+ml-100k`), and metrics.json with the counts.
"""

from __future__ import annotations

import sys

from xdtrain.data.movielens import MovieLensConfig, run_prepare
from xdtrain.jobrunner import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("prepare-movielens", MovieLensConfig, run_prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
