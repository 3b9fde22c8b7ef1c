"""Which adapter a model spec gets: the registry and :func:`load_adapter`.

A module of its own so that the adapters (:mod:`.adapter` for the base and the tiny test model,
:mod:`.adapter_embedded` for real pipelines) import nothing back from here: no import cycle.
"""
from __future__ import annotations

from typing import Callable

from .adapter import ModelAdapter, TinyAdapter
from .adapter_embedded import EmbeddedAdapter, adapter_from_spec

_ADAPTERS: dict[str, Callable[..., ModelAdapter]] = {"tiny": lambda **kw: TinyAdapter(**kw)}


def register_adapter(name: str, factory: Callable[..., ModelAdapter]) -> None:
    _ADAPTERS[name] = factory


def load_adapter(spec: str, device="cpu", latent_shape=None) -> ModelAdapter:
    """Build the adapter for ``spec``: ``tiny``, ``embedded[:random|:tiny]`` or a ``vdit_compile.models.spec`` spec."""
    if spec in _ADAPTERS:
        adapter = _ADAPTERS[spec]()
    elif spec == "embedded" or spec.startswith("embedded:"):
        adapter = EmbeddedAdapter(device=device, spec=spec)
    else:
        adapter = adapter_from_spec(spec, device=device, latent_shape=latent_shape)
    adapter.transformer.to(device)
    return adapter
