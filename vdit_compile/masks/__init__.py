"""Mask families, one per module, behind one interface (:class:`~.base.MaskSpec`, :func:`parse_mask`).

* :mod:`.tile` -- frame tiles ``g<G>w<W>`` and ``dense`` (whole-frame units);
* :mod:`.window3d` -- 3D windows over token tiles ``win3d-t<rt>h<rh>w<rw>[-g<G>]``;
* :mod:`.spatial` -- spatial windows across all frames ``spatial-h<rh>w<rw>[-g<G>]``.

Both window families state their rule through :mod:`.box` (the clamped box; a spatial window spans every frame).

:mod:`.units` says what a unit (token tile) is and how tokens are reordered so a unit is contiguous;
:mod:`vdit_compile.ops.args` encodes per-head specs into the op's arguments and back.
"""
from .base import MaskSpec, as_spec, known_families, masks_density, needs_tiles, parse_mask, register_family, unit_masks
from .spatial import SpatialWindow
from .tile import TileMask, frame_masks, mask_density
from .units import UnitGrid, choose_tile, unit_permutation
from .window3d import Window3D

__all__ = ["MaskSpec", "TileMask", "Window3D", "SpatialWindow", "UnitGrid", "parse_mask", "as_spec",
           "register_family", "known_families", "unit_masks", "masks_density", "needs_tiles", "choose_tile",
           "unit_permutation", "frame_masks", "mask_density"]
