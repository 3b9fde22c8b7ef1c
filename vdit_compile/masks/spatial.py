"""Spatial window across time: each query tile attends to the same spatial neighbourhood in every frame.

Sparse-VideoGen's "temporal heads" (a token follows its own position through the clip) are this family
with radius 0; a radius of ``h`` tile rows and ``w`` tile columns (shifted at the borders like the 3D
window) follows small motions. ``-g<G>`` adds ``G`` global frames (full rows and columns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import MaskSpec, check_int, register_family
from .box import box_keep
from .units import UnitGrid


@register_family
@dataclass(frozen=True)
class SpatialWindow(MaskSpec):
    h: int = 0
    w: int = 0
    g: int = 0

    family: ClassVar[str] = "spatial"
    pattern: ClassVar[str] = r"spatial-h(\d+)w(\d+)(?:-g(\d+))?"
    syntax: ClassVar[str] = "'spatial-h<rh>w<rw>[-g<G>]' (radii in tile rows / columns, every frame)"
    needs_tiles: ClassVar[bool] = True

    def __post_init__(self):
        for f in ("h", "w", "g"):
            check_int(getattr(self, f), f"SpatialWindow {f}")

    @property
    def name(self) -> str:
        return f"spatial-h{self.h}w{self.w}" + (f"-g{self.g}" if self.g else "")

    @classmethod
    def from_match(cls, m) -> "SpatialWindow":
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def keep(self, q: torch.Tensor, k: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
        return box_keep(q, k, grid, grid.num_frames, self.h, self.w, self.g)  # a 3D window spanning every frame
