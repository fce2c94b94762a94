"""Build the entity graph from triplet Parquet and save it for later jobs.

    python -m jobs.build_graph --config configs/graph_ml100k.yaml [key=value ...]
    python -m jobs.build_graph triplets=s3://kg/triplets out=s3://kg/graph links=s3://kg/links
"""

from __future__ import annotations

import sys

from graph.build import GraphBuildConfig, run_build_graph
from xdtrain.jobrunner import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("build-graph", GraphBuildConfig, run_build_graph, argv)


if __name__ == "__main__":
    sys.exit(main())
