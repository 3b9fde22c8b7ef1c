"""Runtime support for rewritten graphs: per-model state and the hooks graphs call back into."""
from .state import OptimizeState

__all__ = ["OptimizeState"]
