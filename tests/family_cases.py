"""Mask-family cases and their element-level oracle, shared by the export and parallel tests.

Every case mixes families per head on a layout with awkward sizes: text prefix and suffix, tiles that
are not square (odd H or W), a frame count that no window divides.  The oracle is plain masked
attention with each head's token-level mask ``spec.element_mask(layout, grid)`` (independent of the
unit machinery the paths under test use), in float64.
"""
from __future__ import annotations

import torch

from vdit_compile import TokenLayout
from vdit_compile.masks import UnitGrid, parse_mask
from vdit_compile.ops.args import encode_masks, op_grid

#: (layout, tile (rows, cols) or None, per-head mask names)
FAMILY_CASES = [
    (TokenLayout(5, 3, 4, text_prefix=3, text_suffix=2), (1, 2),
     ["g1w0", "dense", "win3d-t1h1w1", "spatial-h0w1-g1"]),
    (TokenLayout(6, 2, 3), (1, 3), ["win3d-t1h0w0-g1", "win3d-t1h0w0-g1"]),
    (TokenLayout(7, 3, 3, text_suffix=4), (1, 1), ["spatial-h0w1", "g2w0", "win3d-t2h1w1"]),
]


def case_args(layout: TokenLayout, tile, names) -> tuple:
    """The op's trailing arguments but the scale: ``(text_prefix, text_suffix, grid, masks)``."""
    return layout.text_prefix, layout.text_suffix, op_grid(layout, tile), encode_masks(names)


def element_masks(layout: TokenLayout, tile, names) -> torch.Tensor:
    """``(H, L, L)`` bool: each head's token-level oracle mask."""
    th, tw = tile if tile is not None else (layout.height, layout.width)
    grid = UnitGrid(layout.num_frames, layout.height, layout.width, th, tw)
    return torch.stack([parse_mask(n).element_mask(layout, grid) for n in names])


def element_oracle(q, k, v, layout: TokenLayout, tile, names, scale: float):
    """``(out, lse)`` of masked attention with the element masks, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~element_masks(layout, tile, names)[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse
