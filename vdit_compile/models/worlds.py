"""The procedural worlds a reference model is trained on, by name: ``embedded`` (the default) and ``textured``.

Why a registry: the scorecard, the classifier tools, the demo and the CLI all need "this world's data module,
pipeline loader and scored attributes"; naming a world once here keeps them from importing one world's data
directly (the embedded one was the only one before).
"""
from __future__ import annotations

import importlib
from types import ModuleType

WORLDS = ("embedded", "textured")
DEFAULT_WORLD = "embedded"


def check_world(name: str) -> str:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; expected one of {WORLDS}")
    return name


def world_package(name: str = DEFAULT_WORLD) -> ModuleType:
    """``vdit_compile.models.<name>`` (has ``data``, ``load_pipeline``, ``weights_available``, ``WEIGHTS_DIR``)."""
    return importlib.import_module(f"vdit_compile.models.{check_world(name)}")


def world_data(name: str = DEFAULT_WORLD) -> ModuleType:
    return importlib.import_module(f"vdit_compile.models.{check_world(name)}.data")


def scored_attributes(name: str = DEFAULT_WORLD) -> dict[str, tuple[str, ...]]:
    """Attribute -> class labels that the world's classifier recognises and the scorecard reports."""
    d = world_data(name)
    if hasattr(d, "SCORED_ATTRIBUTES"):
        return {k: tuple(v) for k, v in d.SCORED_ATTRIBUTES.items()}
    return {"shape": tuple(d.SHAPES), "colour": tuple(d.COLOUR_NAMES), "motion": tuple(d.MOTIONS)}


def world_of_pipe(pipe) -> str:
    """The world a pipeline was built for (the textured one has its own pipeline class)."""
    return "textured" if type(pipe).__name__ == "TexturedPipeline" else DEFAULT_WORLD
