"""vdit-compile: make video diffusion transformers fast without hand-editing them."""
from __future__ import annotations

__version__ = "0.1.0"

from .layout import TokenLayout
from .masks import TileMask
from . import ops  # registers torch.ops.vdit.*

__all__ = ["TokenLayout", "TileMask", "ops", "__version__"]
