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


def spatial_axes(model: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """Height and width axes of 5-D ``hidden_states``."""
    channels_last = any(k in type(model).__name__ for k in _CHANNELS_LAST)
    return (2, 3) if channels_last else (3, 4)


def resize_inputs(model: torch.nn.Module, inputs: dict, frames: int | None = None, height: int | None = None,
                  width: int | None = None, seed: int = 0) -> dict:
    """Inputs with ``hidden_states`` of another frame count / height / width (fresh random values).

    Sizes are in the transformer's input units (latent frames and latent pixels for a latent
    model, pixels for the embedded pixel-space model).  Other inputs are kept; a model whose
    other inputs depend on the size (precomputed RoPE tables, ``num_frames`` kwargs) then fails
    to trace and says so.
    """
    if frames is None and height is None and width is None:
        return inputs
    hs = inputs.get("hidden_states")
    if not isinstance(hs, torch.Tensor):
        raise ExportError("--frames/--height/--width resize the 'hidden_states' input, which this model's inputs lack")
    if hs.dim() != 5:
        raise ExportError(
            f"hidden_states of shape {tuple(hs.shape)} has no frame/height/width axes (pre-patchified tokens): "
            "pass --inputs with forward kwargs of the size you want instead of --frames/--height/--width"
        )
    shape = list(hs.shape)
    t_axis = frames_axis(model, hs)
    h_axis, w_axis = spatial_axes(model, hs)
    for axis, value, what in ((t_axis, frames, "--frames"), (h_axis, height, "--height"), (w_axis, width, "--width")):
        if value is not None:
            if value < 1:
                raise ExportError(f"{what} must be >= 1, found {value}")
            shape[axis] = value
    g = torch.Generator().manual_seed(seed)
    return {**inputs, "hidden_states": torch.randn(shape, generator=g, dtype=hs.dtype).to(hs.device)}
