"""FX graph passes (detect, rewrite; later passes register through :mod:`.registry`)."""
from . import detect, rewrite  # noqa: F401  (registers the built-in passes)
from .detect import TILEABLE_KINDS, AttentionSite
from .registry import register_pass, registered_passes, run_passes

__all__ = ["AttentionSite", "TILEABLE_KINDS", "register_pass", "registered_passes", "run_passes"]
