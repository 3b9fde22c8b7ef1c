"""Where the frame axis of a transformer's ``hidden_states`` is, and its temporal patch size.

diffusers video transformers take ``(B, C, T, H, W)`` (Wan, HunyuanVideo, Mochi, ...), ``(B, T, C, H, W)``
(CogVideoX, ConsisID) or ``(B, T, H, W, C)`` (Kandinsky 5); pre-patchified ``(B, N, C)`` inputs (LTX)
have no frame axis, so their frame count cannot be dynamic.  Which axis is which, and the patch sizes,
come from the compile path's token-grid code (:mod:`vdit_compile.passes.grid`): one reading of a video
input for both, so an export never disagrees with the plan it serves.  Failing that the caller must say.
"""
from __future__ import annotations

import torch

from ..passes.grid import patch_sizes, video_axes
from .errors import ExportError


def _axes(model: torch.nn.Module, hidden_states: torch.Tensor):
    """The layout of 5-D ``hidden_states`` as the compile path reads it (:func:`vdit_compile.passes.grid.video_axes`)."""
    name = type(model).__name__
    if hidden_states.dim() != 5:
        raise ExportError(
            f"{name} takes hidden_states of shape {tuple(hidden_states.shape)} (no separate frame axis, e.g. "
            "pre-patchified tokens): the frame count cannot be dynamic; export with fixed --frames"
        )
    g, why = video_axes(model, hidden_states)
    if g is None:
        raise ExportError(f"cannot tell the frame axis of {name}'s hidden_states {tuple(hidden_states.shape)} ({why}); "
                          "pass frames_dim")
    return g.axes


def frames_axis(model: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    """Axis of ``hidden_states`` that holds frames; :class:`ExportError` when there is none or it is ambiguous."""
    return _axes(model, hidden_states).index("T")


def temporal_patch(model: torch.nn.Module) -> int:
    """Input frames per latent token frame (the grid's temporal patch size; 1 when the model has none)."""
    return (patch_sizes(model) or (1, 1, 1))[0]


def spatial_axes(model: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """Height and width axes of 5-D ``hidden_states``."""
    axes = _axes(model, hidden_states)
    return axes.index("H"), axes.index("W")


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
