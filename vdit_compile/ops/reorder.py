"""Token reorder between the model's frame-major order and tile (unit) order, along the sequence axis.

Only the video tokens move; text prefix and suffix stay where they are. One ``index_select`` each way
(the permutation is cached per grid and device): the cost is a copy of q, k, v and the output, which
``benchmarks/attention.py --families`` reports beside the attention time.
"""
from __future__ import annotations

import torch

from ..masks.units import UnitGrid, unit_permutation

_INV: dict = {}


def _inverse(grid: UnitGrid, device) -> torch.Tensor:
    key = (grid, str(device))
    inv = _INV.get(key)
    if inv is None:
        perm = unit_permutation(grid, device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        if len(_INV) > 64:
            _INV.clear()
        _INV[key] = inv
    return inv


def _apply(x: torch.Tensor, pre: int, grid: UnitGrid, index: torch.Tensor) -> torch.Tensor:
    nv = grid.num_frames * grid.height * grid.width
    dim = 2
    video = x.narrow(dim, pre, nv).index_select(dim, index)
    parts = [x.narrow(dim, 0, pre)] if pre else []
    parts.append(video)
    suf = x.shape[dim] - pre - nv
    if suf:
        parts.append(x.narrow(dim, pre + nv, suf))
    return torch.cat(parts, dim) if len(parts) > 1 else video


def to_units(x: torch.Tensor, text_prefix: int, grid: UnitGrid) -> torch.Tensor:
    """``(B, H, L, ...)`` in model order -> unit order (each tile's tokens contiguous)."""
    return _apply(x, int(text_prefix), grid, unit_permutation(grid, x.device))


def from_units(x: torch.Tensor, text_prefix: int, grid: UnitGrid) -> torch.Tensor:
    """Inverse of :func:`to_units`."""
    return _apply(x, int(text_prefix), grid, _inverse(grid, x.device))
