"""vdit-compile: make video diffusion transformers fast without hand-editing them."""
from __future__ import annotations

__version__ = "0.1.0"

from .layout import TokenLayout
from .masks import TileMask
from . import ops  # registers torch.ops.vdit.*
from .config import OptimizeConfig
from .passes.detect import AttentionSite
from .api import NoAttentionFoundError, inspect_model, optimize, plan_of, restore, sites_of

__all__ = [
    "TokenLayout", "TileMask", "ops", "__version__", "OptimizeConfig", "AttentionSite", "NoAttentionFoundError",
    "optimize", "restore", "inspect_model", "plan_of", "sites_of",
]
