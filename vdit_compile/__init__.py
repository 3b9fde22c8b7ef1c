"""vdit-compile: make video diffusion transformers fast without hand-editing them."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # registers torch.ops.vdit.*
from .api import NoAttentionFoundError, check_output, inspect_model, optimize, plan_of, restore, sites_of
from .config import OptimizeConfig
from .layout import TokenLayout
from .masks import SpatialWindow, TileMask, Window3D, parse_mask
from .passes.detect import AttentionSite


def __getattr__(name):
    # Parallel is imported lazily: importing vdit_compile.parallel registers its graph pass and pulls in
    # torch.distributed, which most users of optimize() never need.
    if name == "Parallel":
        from .parallel import Parallel

        return Parallel
    raise AttributeError(f"module 'vdit_compile' has no attribute {name!r}")


__all__ = [
    "TokenLayout", "TileMask", "Window3D", "SpatialWindow", "parse_mask", "ops", "__version__", "OptimizeConfig", "AttentionSite", "NoAttentionFoundError",
    "optimize", "restore", "inspect_model", "plan_of", "sites_of", "check_output", "Parallel",
]
