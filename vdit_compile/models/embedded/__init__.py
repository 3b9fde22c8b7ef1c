"""The embedded default model: procedural text-to-video data, a small Wan DiT and its pipeline."""
from __future__ import annotations

from . import data

__all__ = ["data"]
