"""The denoising timestep of one transformer call: what step-aware plans switch masks on.

Diffusers transformers take it as ``timestep`` (a scalar or a ``(B,)`` tensor); other DiTs use
``t`` or ``timesteps``. The first element is taken: a batch samples one step at a time.
"""
from __future__ import annotations

import torch

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def call_timestep(module: torch.nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The call's timestep as a float, or ``None`` when the call has none that can be read."""
    from ..calibration.inputs import named_forward_kwargs

    try:
        named = named_forward_kwargs(module, args, kwargs)
    except TypeError:
        return None
    for name in TIMESTEP_NAMES:
        t = named.get(name)
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0]) if t.numel() else None
        if isinstance(t, (int, float)):
            return float(t)
    return None
