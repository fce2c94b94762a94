"""Shared pieces of the engine tests: a small generated world and engine configs over it."""

from __future__ import annotations

import json
from pathlib import Path

from xdtrain.config import load_config
from xdtrain.data.synthetic import WorldConfig, generate_world
from xdtrain.train.config import EngineConfig

SMALL = ["model.d=16", "model.max_len=20", "model.layers=1", "train.batch_size=64", "train.epochs=2",
         "train.log_every=1", "train.progress=false", "train.eval_every=1", "eval.candidates=[full]",
         # No wall budget: demo.yaml's 4 minutes once ended the elastic test's run on a slow CI machine
         # before the cluster grew back, so tests stop on epochs/steps only.
         "train.max_minutes=0"]


def make_world(out: Path) -> str:
    cfg = load_config(WorldConfig, "configs/world_demo.yaml",
                      ["users.n_users=800", "graph.n_entities=200", "graph.n_triplets=400", f"out={out}"])
    generate_world(cfg, str(out), progress=False)
    return str(out)


def overrides(world: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.world_url={world}", *SMALL, *extra]


def engine_config(world: str, run_dir: Path, *extra: str) -> EngineConfig:
    return load_config(EngineConfig, "configs/demo.yaml", overrides(world, run_dir, *extra))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "curves.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path) -> dict[int, float]:
    """Train loss by step (the last record of a step wins, as after a restart)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "train"}


def sequences_in(run_dir: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(run_dir / "data" / "train" / "part-00000.parquet").metadata.num_rows
