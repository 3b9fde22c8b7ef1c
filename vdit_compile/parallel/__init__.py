"""Sequence parallelism for tile-sparse video DiTs: Ulysses and tile-ring (docs/parallel.md)."""
from .attention import gather_tokens, parallel_tile_attention, shard_tokens
from .config import CommStats, Parallel, frame_split
from .graph_pass import sequence_parallel_pass, shard_graph  # registers the pass with the core

__all__ = ["Parallel", "CommStats", "frame_split", "parallel_tile_attention", "shard_tokens", "gather_tokens", "shard_graph",
           "sequence_parallel_pass"]
