"""Entity graph: triplets -> DGL graph, neighbour sampling, GNN layers, layer-wise inference.

    from graph import GraphBuildConfig, build_graph, save_graph, load_graph
    from graph import NeighbourSampler, worker_seeds, GATEncoder, RGCNEncoder, PSFeatures, FixedFeatures
    from graph import layerwise_inference

See docs/graph.md for the design and measured figures.
"""

from .build import GraphBuildConfig, build_graph, load_links, read_entity_ids, run_build_graph
from .features import FeatureBatch, FixedFeatures, PSFeatures
from .inference import layerwise_inference, node_chunks
from .nn import GATEncoder, RGCNEncoder
from .sampling import NeighbourSampler, SampledBatch, seed_batches, seed_everything, worker_seeds
from .store import EntityGraph, load_graph, save_graph
from .triplets import BAD_KINDS, BadReport

__all__ = [
    "BAD_KINDS", "BadReport", "EntityGraph", "FeatureBatch", "FixedFeatures", "GATEncoder",
    "GraphBuildConfig", "NeighbourSampler", "PSFeatures", "RGCNEncoder", "SampledBatch", "build_graph",
    "layerwise_inference", "load_graph", "load_links", "node_chunks", "read_entity_ids", "run_build_graph",
    "save_graph", "seed_batches", "seed_everything", "worker_seeds",
]
