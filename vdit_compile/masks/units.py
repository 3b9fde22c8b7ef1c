"""Units: the granularity at which a mask family speaks, and the token order that makes it pay.

A mask says, for every pair of *units*, whether the query unit attends to the key unit. A unit is a
token tile of one frame: ``tile_h x tile_w`` tokens of the frame's ``H x W`` grid (in the layout's
memory order; ``H`` is the outer in-frame axis). The whole frame is the coarsest unit (the frame tile
family needs nothing finer); a 3D window pays only with smaller units, because a kernel block can
skip keys only when the block is one spatio-temporal tile.

Why a reorder: in the model's frame-major order a tile's tokens are not contiguous (a tile row of
``tile_w`` tokens, then a jump of ``W``). :func:`unit_permutation` gives the order in which every
unit's tokens are contiguous, units frame-major then tile row then tile column. In that order a unit
mask is exactly the old frame-level mask with ``T`` := number of units and ``P`` := tokens per unit,
so the op's reference, the CPU op and the Triton kernels' visit lists consume any family unchanged.

Tiles must divide the frame (:func:`choose_tile` only returns divisors): a ragged tile would break the
"``P`` tokens per unit" contract the kernels rely on, so it is never produced; an H or W with no
useful divisor falls back to finer tiles (at worst one token row), never to a wrong result.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class UnitGrid:
    """``T`` frames of ``H x W`` tokens cut into ``tile_h x tile_w`` tiles."""

    num_frames: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    frame_minor: bool = False  # the model's tokens are ordered (H, W, T): frame index fastest

    def __post_init__(self):
        for name in ("num_frames", "height", "width", "tile_h", "tile_w"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"UnitGrid.{name} must be an int >= 1, found {v!r}")
        if self.height % self.tile_h or self.width % self.tile_w:
            raise ValueError(
                f"tile {self.tile_h}x{self.tile_w} does not divide the {self.height}x{self.width} frame: "
                "tiles must divide the frame (see masks.units.choose_tile)"
            )

    @classmethod
    def frames(cls, num_frames: int, height: int, width: int, frame_minor: bool = False) -> "UnitGrid":
        """One unit per frame (the frame tile family's grid; no reorder needed unless frame-minor)."""
        return cls(num_frames, height, width, height, width, frame_minor)

    @property
    def tiles_h(self) -> int:
        return self.height // self.tile_h

    @property
    def tiles_w(self) -> int:
        return self.width // self.tile_w

    @property
    def units_per_frame(self) -> int:
        return self.tiles_h * self.tiles_w

    @property
    def num_units(self) -> int:
        return self.num_frames * self.units_per_frame

    @property
    def unit_tokens(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def is_frames(self) -> bool:
        """True when a unit is a whole frame."""
        return self.units_per_frame == 1

    @property
    def in_unit_order(self) -> bool:
        """True when the model's token order already is unit order (whole frames, frame-major)."""
        return self.is_frames and not self.frame_minor

    @property
    def shape(self) -> tuple[int, int, int]:
        """Units along (t, tile rows, tile columns)."""
        return self.num_frames, self.tiles_h, self.tiles_w

    def with_frames(self, num_frames: int) -> "UnitGrid":
        return UnitGrid(num_frames, self.height, self.width, self.tile_h, self.tile_w, self.frame_minor)

    def unit_coords(self, device=None) -> torch.Tensor:
        """``(N, 3)`` long: (frame, tile row, tile column) of every unit, in unit order."""
        t, i, j = torch.meshgrid(*(torch.arange(n, device=device) for n in self.shape), indexing="ij")
        return torch.stack([t.flatten(), i.flatten(), j.flatten()], dim=1)

    def token_coords(self, device=None) -> torch.Tensor:
        """``(T*H*W, 3)`` long: the unit coordinates of every video token, in the model's token order."""
        t, h, w = torch.meshgrid(*(torch.arange(n, device=device) for n in (self.num_frames, self.height, self.width)),
                                 indexing="ij")
        if self.frame_minor:  # (H, W, T) order
            t, h, w = (x.permute(1, 2, 0) for x in (t, h, w))
        return torch.stack([t.flatten(), h.flatten() // self.tile_h, w.flatten() // self.tile_w], dim=1)

    def describe(self) -> str:
        return f"{self.tile_h}x{self.tile_w}"


@lru_cache(maxsize=64)
def _perm_cpu(num_frames: int, height: int, width: int, tile_h: int, tile_w: int, frame_minor: bool) -> torch.Tensor:
    T, H, W, th, tw = num_frames, height, width, tile_h, tile_w
    idx = torch.arange(T * H * W)
    idx = idx.view(H, W, T).permute(2, 0, 1) if frame_minor else idx.view(T, H, W)  # model index at (t, h, w)
    idx = idx.reshape(T, H // th, th, W // tw, tw)
    return idx.permute(0, 1, 3, 2, 4).reshape(-1).contiguous()


_DEVICE_PERMS: dict = {}


def unit_permutation(grid: UnitGrid, device=None) -> torch.Tensor:
    """``perm`` with ``video_in_unit_order = video[perm]`` (and ``video[perm] = unit_order_video`` back).

    Cached per grid and device: a forward asks for it once per site call.
    """
    key = (grid, str(torch.device(device) if device is not None else "cpu"))
    p = _DEVICE_PERMS.get(key)
    if p is None:
        p = _perm_cpu(grid.num_frames, grid.height, grid.width, grid.tile_h, grid.tile_w, grid.frame_minor).to(device)
        if len(_DEVICE_PERMS) > 64:
            _DEVICE_PERMS.clear()
        _DEVICE_PERMS[key] = p
    return p


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tile(height: int, width: int, target_tokens: int) -> tuple[int, int]:
    """The divisor tile ``(th, tw)`` of an ``H x W`` frame whose size is closest to ``target_tokens``.

    Ties go to the squarer tile (windows are then isotropic in tiles), then to the larger one.
    A target at or above ``H * W`` gives the whole frame.
    """
    if target_tokens >= height * width:
        return height, width
    best = None
    for th in _divisors(height):
        for tw in _divisors(width):
            size = th * tw
            score = (abs(size - target_tokens) / target_tokens, abs(th - tw) / max(th, tw), -size)
            if best is None or score < best[0]:
                best = (score, (th, tw))
    return best[1]
