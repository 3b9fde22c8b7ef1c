"""``copy.deepcopy`` of an optimised model (EMA copies, A/B comparisons).

The optimised module's ``__dict__`` holds a compiled forward and an :class:`OptimizeState` whose
sites and templates reference Dynamo's fake tensors and FX graphs; copying those fails deep inside
torch (or, for the forward closure, would silently keep running the original weights).  Instead the
copy gets what a fresh ``optimize(copy, plan=...)`` would give it: a new state with a deep copy of the
plan (or the uniform mask) and the config, a new compiled forward bound to the copied module, and no
sites yet (they are found again on the copy's first call).
"""
from __future__ import annotations

import copy

from ..runtime.state import OptimizeState


def _copied_root(state: OptimizeState, memo: dict):
    new_root = memo.get(id(state.root))
    if new_root is None:
        raise TypeError(
            "vdit-compile: expected copy.deepcopy of the optimised model (or its pipeline); found a copy of its "
            "forward or state alone, which cannot be rebound to a model: copy the model itself")
    return new_root


def copy_state(state: OptimizeState, memo: dict) -> OptimizeState:
    """A fresh state for the copied root module: same mode, config, plan / uniform mask, parallel config."""
    if id(state) in memo:
        return memo[id(state)]
    if state.mode == "calibrate":
        raise RuntimeError("vdit-compile: expected a model that is optimised or restored; found it in the middle of "
                           "calibration: copy it after optimize() returns")
    new = OptimizeState(_copied_root(state, memo), copy.deepcopy(state.config, memo), state.parallel)
    memo[id(state)] = new
    new.mode = state.mode
    new.plan = copy.deepcopy(state.plan, memo)
    new.uniform_mask = state.uniform_mask
    return new


def copy_forward(forward, memo: dict):
    """The copied module's :class:`~.install.CompiledForward` (compiled lazily, on its first call)."""
    from .install import CompiledForward

    new_module = memo.get(id(forward.module))
    if new_module is None:
        _copied_root(forward.state, memo)  # raises the clear error
    new_state = copy_state(forward.state, memo)
    previous = copy.deepcopy(forward.previous, memo)
    new = CompiledForward(new_module, new_state, previous)
    memo[id(forward)] = new
    return new
