"""Capture: the torch.compile backend and the per-instance forward routing."""
from .backend import PassContext, make_backend
from .install import install, state_of, uninstall

__all__ = ["PassContext", "make_backend", "install", "state_of", "uninstall"]
