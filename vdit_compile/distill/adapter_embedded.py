"""Adapters for real pipelines: the embedded default and ``vdit_compile.cli.model_spec`` specs."""
from __future__ import annotations

from .adapter import ModelAdapter


class EmbeddedAdapter(ModelAdapter):
    name = "embedded"

    def __init__(self, device="cpu"):
        raise NotImplementedError("embedded adapter pending")


def adapter_from_spec(spec: str, device="cpu") -> ModelAdapter:
    raise NotImplementedError(spec)
