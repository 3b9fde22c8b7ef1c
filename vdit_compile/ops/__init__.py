"""Custom ops (schemas, fakes, autograd) and their exact reference implementation."""
from .reference import dense_masked_attention, reference_tile_attention
from .tile_attention import tile_attention, tile_attention_out

__all__ = ["tile_attention", "tile_attention_out", "reference_tile_attention", "dense_masked_attention"]
