"""The "attention tile" mask family (Efficient-vDiT), generalised with a temporal window.

A :class:`TileMask` says, for every query frame ``f`` of a clip with ``T`` frames, which key
frames it attends to:

* its own frame;
* the first ``g`` frames (global reference frames);
* frames within ``+-w`` of ``f`` (temporal window, our generalisation);
* the reference frames' own queries (``f < g``) attend to every frame, so reference frames
  are full rows *and* columns, as in the paper's ``k:(T-k)`` masks; kept tiles grow
  linearly in ``T``.

Text tokens attend to everything and are attended by everything (handled by the op).

The rule is parametric in ``T``: a plan calibrated at one frame count applies at another
with the same ``g`` (clamped to ``T``) and ``w``.  ``dense=True`` keeps everything.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..layout import TokenLayout

#: Encoding of a dense head in the op's integer arguments (``global_frames[h] = DENSE``).
DENSE = -1


@dataclass(frozen=True)
class TileMask:
    global_frames: int = 0
    window: int = 0
    dense: bool = False

    def __post_init__(self):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (self.global_frames, self.window)):
            raise TypeError(f"TileMask needs integer global_frames and window, found g={self.global_frames!r} "
                            f"({type(self.global_frames).__name__}), w={self.window!r} ({type(self.window).__name__})")
        if not self.dense and (self.global_frames < 0 or self.window < 0):
            raise ValueError(
                f"TileMask needs global_frames >= 0 and window >= 0, found g={self.global_frames}, w={self.window}"
            )

    @property
    def name(self) -> str:
        return "dense" if self.dense else f"g{self.global_frames}w{self.window}"

    @classmethod
    def parse(cls, name: str) -> "TileMask":
        if name == "dense":
            return cls(dense=True)
        m = re.fullmatch(r"g(\d+)w(\d+)", name)
        if not m:
            raise ValueError(f"unknown tile mask name {name!r}: expected 'dense' or 'g<int>w<int>' (e.g. 'g1w0')")
        return cls(int(m.group(1)), int(m.group(2)))

    def frame_mask(self, num_frames: int, device=None) -> torch.Tensor:
        """Boolean ``(T, T)`` matrix: ``[query frame, key frame]`` kept."""
        T = num_frames
        if self.dense:
            return torch.ones(T, T, dtype=torch.bool, device=device)
        f = torch.arange(T, device=device)
        qf, kf = f[:, None], f[None, :]
        g = min(self.global_frames, T)
        return ((qf - kf).abs() <= self.window) | (kf < g) | (qf < g)

    def op_args(self) -> tuple[int, int]:
        return (DENSE, 0) if self.dense else (self.global_frames, self.window)


def frame_masks(masks: Sequence[TileMask], num_frames: int, device=None) -> torch.Tensor:
    """Stack per-head masks into a boolean ``(H, T, T)`` tensor."""
    return torch.stack([m.frame_mask(num_frames, device) for m in masks])


def frame_masks_from_args(global_frames: Sequence[int], windows: Sequence[int], num_frames: int, device=None) -> torch.Tensor:
    """Inverse of :func:`op_mask_args`: the ``(H, T, T)`` frame mask the op's integer arguments encode."""
    if len(global_frames) != len(windows):
        raise ValueError(f"global_frames and windows must have one entry per head, found {len(global_frames)} and {len(windows)}")
    masks = [TileMask(dense=True) if g == DENSE else TileMask(g, w) for g, w in zip(global_frames, windows)]
    return frame_masks(masks, num_frames, device)


def op_mask_args(masks: Sequence[TileMask]) -> tuple[list[int], list[int]]:
    """Encode per-head masks as the op's ``(global_frames, windows)`` integer lists."""
    gs, ws = zip(*(m.op_args() for m in masks)) if masks else ((), ())
    return list(gs), list(ws)


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
