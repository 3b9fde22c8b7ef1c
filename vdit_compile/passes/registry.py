"""Ordered registry of graph passes run by the capture backend on every Dynamo graph.

A pass is ``fn(gm, ctx) -> gm``.  ``ctx`` is the :class:`~vdit_compile.runtime.context.PassContext`
of one graph (``.sites``, ``.plan``, ``.config``, ``.parallel``, ``.mode``).  Passes run in
ascending ``order``; the built-in ones use 100 (detect) and 200 (calibration probe or tile
rewrite), so later passes (sequence parallelism registers at 300) see rewritten graphs.
Registration is by name so re-importing a module replaces its pass instead of adding it twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx

PassFn = Callable[[torch.fx.GraphModule, object], torch.fx.GraphModule]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    order: int
    fn: PassFn


_PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, order: int):
    """Decorator: register ``fn(gm, ctx) -> gm`` to run at ``order`` (lower runs first)."""

    def deco(fn: PassFn) -> PassFn:
        _PASSES[name] = RegisteredPass(name, int(order), fn)
        return fn

    return deco


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)


def registered_passes() -> list[RegisteredPass]:
    """Passes in run order (ties broken by name, so the order is deterministic)."""
    return sorted(_PASSES.values(), key=lambda p: (p.order, p.name))


def run_passes(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for p in registered_passes():
        out = p.fn(gm, ctx)
        gm = out if out is not None else gm
    return gm
