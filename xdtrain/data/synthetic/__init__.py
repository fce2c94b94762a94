"""Seeded synthetic multi-domain worlds with planted ground truth (the data every method test uses).

    from xdtrain.data.synthetic import WorldConfig, generate_world
    summary = generate_world(WorldConfig(seed=1), "data/worlds/small")

See `generate.py` for the output layout, `interactions.py` for the choice model,
`latents.py` for the planted latents and exposure process, `graph.py` for the entity graph.
"""

from .config import (
    ChoiceConfig,
    DomainConfig,
    GraphConfig,
    LatentConfig,
    ObservationConfig,
    OutputConfig,
    PopularityConfig,
    SequenceConfig,
    TextConfig,
    UserConfig,
    WorldConfig,
    validate,
)
from .generate import generate_world, run_gen_data, schemas
from .interactions import UserBlock, iter_blocks, n_blocks, simulate_block
from .latents import World, build_world

__all__ = [
    "ChoiceConfig", "DomainConfig", "GraphConfig", "LatentConfig", "ObservationConfig", "OutputConfig",
    "PopularityConfig", "SequenceConfig", "TextConfig", "UserConfig", "WorldConfig", "validate",
    "generate_world", "run_gen_data", "schemas", "UserBlock", "iter_blocks", "n_blocks", "simulate_block",
    "World", "build_world",
]
