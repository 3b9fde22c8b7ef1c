"""Mask families at frame granularity (one family per module)."""
from .tile import TileMask, frame_masks, mask_density, op_mask_args

__all__ = ["TileMask", "frame_masks", "mask_density", "op_mask_args"]
