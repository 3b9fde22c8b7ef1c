"""Where the frame axis of a transformer's ``hidden_states`` is, and its temporal patch size.

diffusers video transformers take ``(B, C, T, H, W)`` (Wan, HunyuanVideo, Mochi, ...), ``(B, T, C, H, W)``
(CogVideoX, ConsisID) or ``(B, T, H, W, C)`` (Kandinsky 5); pre-patchified ``(B, N, C)`` inputs (LTX)
have no frame axis, so their frame count cannot be dynamic.  The channel count from the config breaks
ties; when it cannot (C == T), the class name decides, and failing that the caller must say.
"""
from __future__ import annotations

import torch

from .errors import ExportError

_FRAMES_FIRST = ("CogVideoX", "ConsisID")
_CHANNELS_LAST = ("Kandinsky5",)


def _in_channels(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("in_channels", "in_visual_dim"):
        val = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(val, int):
            return val
    return None


def frames_axis(model: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    """Axis of ``hidden_states`` that holds frames; :class:`ExportError` when there is none or it is ambiguous."""
    name = type(model).__name__
    if hidden_states.dim() != 5:
        raise ExportError(
            f"{name} takes hidden_states of shape {tuple(hidden_states.shape)} (no separate frame axis, e.g. "
            "pre-patchified tokens): the frame count cannot be dynamic; export with fixed --frames"
        )
    if any(k in name for k in _CHANNELS_LAST):
        return 1
    c = _in_channels(model)
    s = hidden_states.shape
    if c is not None and s[1] == c and s[2] != c:
        return 2
    if c is not None and s[2] == c and s[1] != c:
        return 1
    if any(k in name for k in _FRAMES_FIRST):
        return 1
    if c is not None and s[1] == c:
        return 2
    raise ExportError(f"cannot tell the frame axis of {name}'s hidden_states {tuple(s)}; pass frames_dim")


def temporal_patch(model: torch.nn.Module) -> int:
    """Input frames per latent token frame (``patch_size_t`` or ``patch_size[0]``; 1 when absent)."""
    cfg = getattr(model, "config", None)
    pt = getattr(cfg, "patch_size_t", None) if cfg is not None else None
    if isinstance(pt, int) and pt > 0:
        return pt
    ps = getattr(cfg, "patch_size", None) if cfg is not None else None
    if isinstance(ps, (tuple, list)) and len(ps) == 3:
        return int(ps[0])
    return 1
