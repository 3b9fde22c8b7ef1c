"""The clamped box: the one rule behind both window families.

A 3D window (:mod:`.window3d`) keeps the key units inside a ``(2t+1) x (2h+1) x (2w+1)`` box of units around
the query unit, shifted at the borders so it keeps its size; a spatial window (:mod:`.spatial`) is the same box
with a temporal radius that spans every frame. Stating the box once keeps the two families from drifting
apart (the border shift, the global frames) and keeps every expression FlexAttention-compilable: the rule
only indexes ``q[..., axis]`` and ``k[..., axis]`` and never builds a tensor of its own.
"""
from __future__ import annotations

import torch

from .units import UnitGrid


def clamped_window(q: torch.Tensor, k: torch.Tensor, radius: int, n: int) -> torch.Tensor:
    """``k`` inside a window of ``2 * radius + 1`` around ``q`` on an axis of ``n`` units, shifted at the
    borders so the window keeps its size (sliding tile attention's rule); the whole axis if it is shorter."""
    if 2 * radius + 1 >= n:
        return (k - q).abs() < n  # always true; an expression, not a new tensor, so FlexAttention's mask_mod compiles
    centre = q.clamp(radius, n - 1 - radius)
    return (k - centre).abs() <= radius


def global_frames_keep(q: torch.Tensor, k: torch.Tensor, g: int) -> torch.Tensor:
    """Full rows and columns for the first ``g`` frames (reference frames)."""
    return (q[..., 0] < g) | (k[..., 0] < g)


def box_keep(q: torch.Tensor, k: torch.Tensor, grid: UnitGrid, t: int, h: int, w: int, g: int = 0) -> torch.Tensor:
    """Query unit keeps key unit: inside the clamped box of radii ``t`` frames, ``h`` tile rows and ``w`` tile
    columns, or either one in the first ``g`` frames. A radius of at least half the axis keeps the whole axis
    (``t = grid.num_frames``: every frame, the spatial family)."""
    nt, nh, nw = grid.shape
    box = (clamped_window(q[..., 0], k[..., 0], t, nt) & clamped_window(q[..., 1], k[..., 1], h, nh)
           & clamped_window(q[..., 2], k[..., 2], w, nw))
    return box | global_frames_keep(q, k, g) if g else box
