"""3D window family: each query tile attends to the key tiles of a ``(2t+1) x (2h+1) x (2w+1)`` box.

This is sliding tile attention's structure (FastVideo): the box is in units of token tiles, centred on
the query's tile and shifted at the borders so it keeps its size. ``-g<G>`` unions it with ``G`` global
frames (full rows and columns, as the frame tile family's reference frames), LVSA-style anchors.
Heads of large video DiTs that attend to a spatio-temporal neighbourhood are kept sparse by it where a
frame tile must stay dense. It pays only on tile units (the op reorders tokens into tiles).
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
class Window3D(MaskSpec):
    t: int = 1
    h: int = 1
    w: int = 1
    g: int = 0

    family: ClassVar[str] = "win3d"
    pattern: ClassVar[str] = r"win3d-t(\d+)h(\d+)w(\d+)(?:-g(\d+))?"
    syntax: ClassVar[str] = "'win3d-t<rt>h<rh>w<rw>[-g<G>]' (window radii in frames / tile rows / tile columns)"
    needs_tiles: ClassVar[bool] = True

    def __post_init__(self):
        for f in ("t", "h", "w", "g"):
            check_int(getattr(self, f), f"Window3D {f}")

    @property
    def name(self) -> str:
        return f"win3d-t{self.t}h{self.h}w{self.w}" + (f"-g{self.g}" if self.g else "")

    @classmethod
    def from_match(cls, m) -> "Window3D":
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0))

    def keep(self, q: torch.Tensor, k: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
        return box_keep(q, k, grid, self.t, self.h, self.w, self.g)
