"""Route one module instance's ``forward`` through ``torch.compile`` with the vdit backend.

The compiled wrapper is stored as an instance attribute (``module.forward``), so other instances
of the class and the class itself are untouched; :func:`uninstall` deletes it and the original
bound method is back.  The wrapper records the call's arguments (the backend reads the token
grid from them) and turns a compiler failure caused by our own passes back into its original
exception (e.g. ``PlanMismatchError``).
"""
from __future__ import annotations

import functools

import torch

from ..kernels.options import KernelOptions, kernel_options
from ..runtime.state import OptimizeState
from .backend import make_backend

_ATTR = "_vdit_state"
_PREV = "_vdit_previous_forward"
#: Dynamo's per-code-object recompile limit is raised to at least this inside the optimised forward's
#: calls (mode switches, step ranges and many model instances of one class each compile the same ``forward``).
MIN_RECOMPILE_LIMIT = 256


#: Value-dependent shapes (Mochi/Framepack trim padded text with ``nonzero``) are captured as
#: symbolic sizes instead of breaking the graph, so the detection pass sees those sites and can
#: report them (left dense) instead of never seeing them.
_DYNAMO_OPTIONS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


def _dynamo_options() -> dict:
    """Dynamo settings for the optimised forward's calls only (``config.patch`` restores them after each call,
    so nothing outside the optimised model sees them and :func:`uninstall` has nothing to undo)."""
    cfg = torch._dynamo.config
    opts = dict(_DYNAMO_OPTIONS)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            opts[name] = max(getattr(cfg, name), MIN_RECOMPILE_LIMIT)
    if hasattr(cfg, "accumulated_recompile_limit"):
        opts["accumulated_recompile_limit"] = max(cfg.accumulated_recompile_limit, 4 * MIN_RECOMPILE_LIMIT)
    return opts


def state_of(module: torch.nn.Module) -> OptimizeState | None:
    return module.__dict__.get(_ATTR)


def install(module: torch.nn.Module, state: OptimizeState) -> None:
    """(Re)compile ``module.forward`` for ``state``'s current mode."""
    if _ATTR in module.__dict__:  # re-install (mode switch): keep what was there before the first install
        previous = module.__dict__.get(_PREV)
    else:  # an instance-level forward (e.g. accelerate offload hooks) is wrapped, and restored later
        previous = module.__dict__.get("forward")
    original = previous if previous is not None else type(module).forward.__get__(module)
    # one compiled callable per step range of a step-aware plan: each has its own backend object, so Dynamo
    # (whose guards check the backend) compiles each range once and never serves one range's masks to another
    compiled: dict = {}

    def compiled_for(step_range):
        if step_range not in compiled:
            compiled[step_range] = torch.compile(original, backend=make_backend(state), dynamic=False)
        return compiled[step_range]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        state.call = (args, kwargs)
        state.pending_error = None
        state.step_range = _step_range(state, module, args, kwargs)
        try:
            with torch._dynamo.config.patch(**_dynamo_options()), kernel_options(_kernel_options(state)):
                return compiled_for(state.step_range)(*args, **kwargs)
        except Exception as exc:
            inner = state.pending_error
            if inner is not None and exc is not inner:
                state.pending_error = None
                raise inner.with_traceback(inner.__traceback__) from None
            raise

    module.__dict__["forward"] = forward
    module.__dict__[_ATTR] = state
    module.__dict__[_PREV] = previous


def _kernel_options(state: OptimizeState) -> KernelOptions | None:
    """The model's kernel options (``OptimizeConfig.kernel``); ``None`` keeps the current ones."""
    return getattr(state.config, "kernel", None)


def _step_range(state: OptimizeState, module, args, kwargs) -> int | None:
    """The running call's step range under a step-aware plan in apply mode (else ``None``)."""
    plan = state.plan
    if state.mode != "apply" or plan is None or not plan.step_aware:
        return None
    from ..runtime.timestep import call_timestep

    return plan.step_range_of(call_timestep(module, args, kwargs))


def uninstall(module: torch.nn.Module) -> OptimizeState | None:
    """Put back the forward the module had before :func:`install`; returns the state (or None)."""
    if _ATTR not in module.__dict__:
        return None
    previous = module.__dict__.pop(_PREV, None)
    module.__dict__.pop("forward", None)
    if previous is not None:
        module.__dict__["forward"] = previous
    return module.__dict__.pop(_ATTR, None)
