"""Triton tile-sparse flash attention (forward + backward) and its block visit lists.

Importing this package does not need Triton; :func:`tile_attention_triton.available` says
whether the kernels can run here.  The core's ``torch.ops.vdit.tile_attention`` uses
:mod:`.tile_attention_triton` as its CUDA implementation.
"""
from .visit import Side, TilePlan, VisitList, clear_cache, tile_plan

__all__ = ["Side", "TilePlan", "VisitList", "clear_cache", "tile_plan"]
