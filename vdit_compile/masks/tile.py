"""The frame tile family (Efficient-vDiT's "attention tile"), generalised with a temporal window.

A :class:`TileMask` says, for every query frame ``f`` of a clip with ``T`` frames, which key
frames it attends to:

* its own frame;
* the first ``g`` frames (global reference frames);
* frames within ``+-w`` of ``f`` (temporal window, our generalisation);
* the reference frames' own queries (``f < g``) attend to every frame, so reference frames
  are full rows *and* columns, as in the paper's ``k:(T-k)`` masks; kept tiles grow
  linearly in ``T``.

Text tokens attend to everything and are attended by everything (handled by the op).
The rule only reads frames, so it runs on whole-frame units (no token reorder).
The rule is parametric in ``T``: a plan calibrated at one frame count applies at another
with the same ``g`` (clamped to ``T``) and ``w``.  ``dense=True`` keeps everything (the
``dense`` mask of every family set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..layout import TokenLayout
from .base import MaskSpec, check_int, register_family
from .units import UnitGrid


@register_family
@dataclass(frozen=True)
class TileMask(MaskSpec):
    global_frames: int = 0
    window: int = 0
    dense: bool = False

    family: ClassVar[str] = "tile"
    pattern: ClassVar[str] = r"dense|g(\d+)w(\d+)"
    syntax: ClassVar[str] = "'g<int>w<int>' (first g frames global, window +-w frames, e.g. 'g1w0') or 'dense'"

    def __post_init__(self):
        if not self.dense:
            check_int(self.global_frames, "TileMask global_frames (g)")
            check_int(self.window, "TileMask window (w)")

    @property
    def name(self) -> str:
        return "dense" if self.dense else f"g{self.global_frames}w{self.window}"

    @classmethod
    def from_match(cls, m) -> "TileMask":
        return cls(dense=True) if m.group(0) == "dense" else cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def parse(cls, name: str) -> "TileMask":
        """A frame tile name (``'g1w0'`` / ``'dense'``); other families: :func:`~vdit_compile.masks.parse_mask`."""
        from .base import parse_mask

        spec = parse_mask(name)
        if not isinstance(spec, TileMask):
            raise ValueError(f"{name!r} is a {spec.family} mask, not a frame tile mask ({cls.syntax})")
        return spec

    def keep(self, q: torch.Tensor, k: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
        qf, kf = q[..., 0], k[..., 0]
        if self.dense:
            return (qf - kf).abs() >= 0  # always true, as an expression (compiles inside a FlexAttention mask_mod)
        g = min(self.global_frames, grid.num_frames)
        return ((qf - kf).abs() <= self.window) | (kf < g) | (qf < g)

    def frame_mask(self, num_frames: int, device=None) -> torch.Tensor:
        """Boolean ``(T, T)`` matrix: ``[query frame, key frame]`` kept."""
        return self.unit_mask(UnitGrid.frames(num_frames, 1, 1), device)


def frame_masks(masks: Sequence[TileMask], num_frames: int, device=None) -> torch.Tensor:
    """Stack per-head frame masks into a boolean ``(H, T, T)`` tensor."""
    return torch.stack([m.frame_mask(num_frames, device) for m in masks])


def mask_density(mask: torch.Tensor, layout: TokenLayout) -> float:
    """Kept fraction of the full ``L x L`` attention matrix, text rows/columns included.

    ``mask`` is a ``(T, T)`` or ``(H, T, T)`` frame mask; for several heads the mean is returned.
    """
    if mask.dim() == 2:
        mask = mask[None]
    P, L = layout.frame_tokens, layout.seq_len
    text = layout.text_prefix + layout.text_suffix
    video_video = mask.flatten(1).sum(1).double() * P * P
    kept = video_video + (2 * text * L - text * text)
    return float((kept / (L * L)).mean())
