"""The vdit ``torch.compile`` backend: run the registered passes on each Dynamo graph, then compile.

Dynamo hands every captured graph (one per graph-break segment, again on every recompile for
new shapes) to :func:`make_backend`'s callable.  It builds a :class:`PassContext` with the
token grid of the call being compiled, runs the passes in registry order (detect, rewrite,
then e.g. sequence parallelism) and returns either the graph's own ``forward`` (eager: CPU
default, calibration, graphs that call back into Python) or inductor's compiled function.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..passes import registry
from ..passes.grid import GridInfo, infer_grid
from ..runtime.state import OptimizeState


@dataclass
class PassContext:
    """What passes see for one graph: ``.sites``, ``.plan``, ``.config``, ``.parallel``, ``.mode``."""

    gm: torch.fx.GraphModule
    example_inputs: list
    state: OptimizeState
    grid: GridInfo | None
    grid_reason: str
    templates: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    rewritten: list = field(default_factory=list)
    needs_eager: bool = False
    backend: str = "eager"  # what the graph is handed to after the passes: "eager" or "inductor"

    @property
    def plan(self):
        return self.state.plan

    @property
    def config(self):
        return self.state.config

    @property
    def parallel(self):
        return self.state.parallel

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def root_names(self):
        return self.state.root_names


def is_dense_3d(site) -> bool:
    """A 3D (video self / joint) attention site that cannot be tiled: the user is warned.

    Read from the site's typed fields (kind, layout, ``video``), never from its human-readable reason."""
    return bool(getattr(site, "dense_3d", False))


def resolve_backend(name: str, device_type: str) -> str:
    if name == "auto":
        return "inductor" if device_type == "cuda" else "eager"
    if name not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'auto', 'inductor' or 'eager', found {name!r}")
    return name


def _device_type(example_inputs) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


def make_backend(state: OptimizeState):
    """A fresh backend callable bound to ``state`` (a new one per mode, so Dynamo recompiles).

    It holds the state (and through it the model) only weakly: Dynamo keeps every backend it has seen in a
    process-wide table until ``torch._dynamo.reset()`` (``eval_frame.cached_backends``), so a strong reference
    here would keep each optimised model alive for the life of the process.
    """
    state_ref = weakref.ref(state)

    def vdit_backend(gm: torch.fx.GraphModule, example_inputs):
        state = state_ref()
        if state is None:  # the model was freed; Dynamo cannot compile for it any more
            raise RuntimeError("vdit-compile: the optimised model this graph belongs to was freed")
        args, kwargs = state.call
        grid, why = infer_grid(state.root, args, kwargs)
        backend = resolve_backend(getattr(state.config, "backend", "auto"), _device_type(example_inputs))
        if state.mode != "apply":
            backend = "eager"
        ctx = PassContext(gm, list(example_inputs), state, grid, why, backend=backend)
        try:
            gm = registry.run_passes(gm, ctx)
        except Exception as exc:  # surfaced by the wrapper with its own type, not as a compiler failure
            state.pending_error = exc
            raise
        state.graphs += 1
        state.rewritten.update(ctx.rewritten)
        for s in ctx.sites:
            if not any(t.shared and s.tileable for t in ctx.templates if t.site is s):
                state.record_site(s)  # tileable sites of shared graphs are recorded per instance at run time
            if is_dense_3d(s):
                state.warn_once(s.name, f"vdit-compile: 3D attention site left dense: {s.describe()}")
        if backend == "eager" or ctx.needs_eager:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    return vdit_backend
