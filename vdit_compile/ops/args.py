"""The op's mask arguments: ``grid`` (ints) and ``masks`` (one string), and what they resolve to.

``grid = [T, H, W, tile_h, tile_w]`` is the site's video grid and its token tile (a sixth entry ``1``
marks frame-minor tokens, ordered ``(H, W, T)``; they always run reordered);
``masks`` is one mask name for every head or ``H`` comma-separated names (any registered family).
Both are constants in a traced graph (hashable, constant-foldable in export), so the op stays
parametric in ``T`` and the kernels' visit lists are cached by them.

:func:`resolve` turns them into an :class:`OpMasks`: the specs per head, the unit grid actually used
(whole frames when no head's family looks inside a frame, so the frame tile family never pays a
reorder), and the per-head unit masks, built once and cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch

from ..layout import TokenLayout
from ..masks.base import MaskSpec, as_spec, needs_tiles, parse_mask, unit_masks
from ..masks.units import UnitGrid


def encode_masks(masks: Sequence) -> str:
    """Per-head specs (or names) -> the op's ``masks`` string (one name when all heads agree)."""
    names = [as_spec(m).name for m in masks]
    if not names:
        raise ValueError("encode_masks needs at least one mask")
    return names[0] if len(set(names)) == 1 else ",".join(names)


def op_grid(layout: TokenLayout, tile: Sequence[int] | None = None) -> list[int]:
    """The op's ``grid`` argument for a site layout and tile (``None``: whole frames)."""
    th, tw = (layout.height, layout.width) if tile is None else (int(tile[0]), int(tile[1]))
    grid = [layout.num_frames, layout.height, layout.width, th, tw]
    return grid + [1] if layout.order == "HWT" else grid


def grid_of(grid: Sequence[int]) -> UnitGrid:
    if len(grid) not in (5, 6):
        raise ValueError(f"tile_attention: grid must be [T, H, W, tile_h, tile_w] (+ [1] if frame-minor), found {list(grid)}")
    return UnitGrid(*(int(x) for x in grid[:5]), frame_minor=len(grid) == 6 and bool(grid[5]))


@lru_cache(maxsize=256)
def _specs(masks: str) -> tuple[MaskSpec, ...]:
    if not isinstance(masks, str) or not masks:
        raise ValueError(f"tile_attention: masks must be a non-empty string of mask names, found {masks!r}")
    return tuple(parse_mask(n) for n in masks.split(","))


@dataclass(frozen=True)
class OpMasks:
    """Resolved mask arguments of one op call (hashable: the kernels' plan cache keys on it)."""

    grid: UnitGrid  # the grid the op runs on (whole frames when no spec needs tiles)
    specs: tuple[MaskSpec, ...]  # one per head
    reorder: bool  # tokens are permuted into tile order around the computation
    _unit: list = field(default_factory=list, compare=False, hash=False, repr=False)

    @property
    def key(self) -> tuple:
        return (self.grid, tuple(s.name for s in self.specs))

    def unit_mask(self) -> torch.Tensor:
        """``(H, N, N)`` bool on the CPU (built once, always as a real tensor: a first call under a trace, e.g. an
        export decomposition's fake/proxy mode, must not leave a fake tensor in the cache)."""
        if not self._unit:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with unset_fake_temporarily(), disable_proxy_modes_tracing():
                self._unit.append(unit_masks(self.specs, self.grid))
        return self._unit[0]

    def unit_layout(self, seq_len: int, text_prefix: int, text_suffix: int) -> TokenLayout:
        """The call's layout in unit space: ``N`` "frames" of ``U`` tokens (what the kernels and reference take)."""
        g = self.grid
        lay = TokenLayout(g.num_units, g.unit_tokens, 1, int(text_prefix), int(text_suffix))
        lay.check_seq_len(seq_len)
        return lay


@lru_cache(maxsize=256)
def _resolve(num_heads: int, grid: tuple, masks: str) -> OpMasks:
    ug = grid_of(grid)
    specs = _specs(masks)
    if len(specs) not in (1, num_heads):
        raise ValueError(f"tile_attention: {len(specs)} masks for {num_heads} heads (expected 1 or {num_heads}): "
                         f"{masks!r}")
    specs = specs * num_heads if len(specs) == 1 else specs
    tiles = needs_tiles(specs) and not ug.is_frames
    used = ug if tiles else UnitGrid.frames(ug.num_frames, ug.height, ug.width, ug.frame_minor)
    return OpMasks(used, specs, not used.in_unit_order)


def resolve(num_heads: int, grid: Sequence[int], masks: str) -> OpMasks:
    return _resolve(int(num_heads), tuple(int(x) for x in grid), masks)


def check_inputs(q, k, v, text_prefix, text_suffix, grid, masks) -> OpMasks:
    """Shapes and arguments of one op call; a clear error naming what was expected and found."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "tile_attention expects q, k, v of shape (B, H, L, D) with equal B, H, L; "
            f"found q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    om = resolve(q.shape[1], grid, masks)
    g = om.grid
    video = q.shape[2] - int(text_prefix) - int(text_suffix)
    if video != g.num_frames * g.height * g.width:
        raise ValueError(
            f"tile_attention: sequence of {q.shape[2]} tokens minus text ({int(text_prefix)} prefix + "
            f"{int(text_suffix)} suffix) = {video} video tokens, but the grid {list(grid)[:3]} has "
            f"{g.num_frames * g.height * g.width}"
        )
    return om
