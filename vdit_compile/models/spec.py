"""Resolve a model spec (the CLI's MODEL argument, tools' and evaluation's model names) into a model or pipeline.

Below the CLI: evaluation, distillation, tools and the CLI itself import it from here.

Accepted specs (nothing is downloaded; every form loads from local files or code):

* ``embedded``: the embedded default pipeline with its shipped weights; ``embedded:DIR``: the same model with
  the weights in DIR (a ``tools/train_reference.py`` run's ``weights/``, to score a run before shipping it);
  ``embedded:random`` / ``embedded:tiny``: randomly initialised (tiny = 2 layers, for tests).
* ``PATH`` to a diffusers pretrained directory: ``model_index.json`` -> ``DiffusionPipeline.from_pretrained``;
  ``config.json`` (+ weights) -> the model class named by its ``_class_name``.
* ``PATH/config.json`` (a file): that model class, randomly initialised from the config.
* ``DiffusersClass:PATH/config.json``: e.g. ``WanTransformer3DModel:cfg.json``, random init from the config.
* ``module:factory`` or ``file.py:factory``: import and call ``factory()``; it returns a model, a
  pipeline, or ``(model, example_inputs)`` where ``example_inputs`` is a dict of forward kwargs.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from .._optional import available

SPEC_HELP = ("MODEL: 'embedded', 'embedded:random', 'embedded:tiny' (or 'textured', 'textured:...': the textured "
             "world's model), a diffusers pretrained directory, a config.json, "
             "'DiffusersClass:config.json', or 'module:factory' / 'file.py:factory'")


class ModelSpecError(ValueError):
    """A MODEL spec that cannot be loaded; the message says which forms are accepted."""


def load_model(spec: str):
    """The model or pipeline named by ``spec`` (see module doc)."""
    return load_model_and_inputs(spec)[0]


def load_model_and_inputs(spec: str) -> tuple[Any, dict | None]:
    """Like :func:`load_model`, plus example forward kwargs when the spec provides them."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; expected {SPEC_HELP}")
    spec = spec.strip()
    if spec == "embedded" or spec.startswith("embedded:"):
        return _embedded(spec), None
    if spec == "textured" or spec.startswith("textured:"):
        return _embedded(spec, world="textured"), None
    path = Path(spec)
    if path.exists():
        return _from_path(path), None
    if ":" in spec:
        left, right = spec.rsplit(":", 1)
        if right.endswith(".json") or Path(right).exists():
            return _diffusers_class_from_config(left, Path(right)), None
        return _factory(left, right)
    raise ModelSpecError(f"cannot interpret model spec {spec!r}: no such file or directory, and not of the form "
                         f"'module:factory'. Expected {SPEC_HELP}")


def _embedded(spec: str, world: str = "embedded"):
    """A reference world's pipeline: the embedded model, or with ``world`` another one (same spec forms)."""
    try:
        from ..models.worlds import world_package

        load_pipeline = world_package(world).load_pipeline
    except ImportError as exc:
        raise ModelSpecError(f"the {world} model is not available in this installation ({exc})") from exc
    variant = spec.partition(":")[2]
    if variant == "":
        try:
            return load_pipeline()
        except FileNotFoundError as exc:
            if world == "embedded":
                raise
            raise ModelSpecError(str(exc)) from exc
    if variant == "random":
        return load_pipeline(weights=None)
    if variant == "tiny":
        return load_pipeline(weights=None, tiny=True)
    if Path(variant).is_dir():  # a weights directory written by save_embedded (e.g. a training run's weights/)
        if not (Path(variant) / "config.json").is_file():
            raise ModelSpecError(f"{world} weights directory {variant!r} has no config.json: expected the "
                                 f"weights/ folder written by tools/train_reference.py")
        return load_pipeline(weights=Path(variant))
    raise ModelSpecError(f"unknown {world} variant {variant!r}: expected '{world}', '{world}:random', "
                         f"'{world}:tiny' or '{world}:WEIGHTS_DIR' (an existing directory)")


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelSpecError(f"diffusers has no class {name!r} (diffusers {diffusers.__version__})")
    return cls


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"cannot read model config {path}: {exc}") from exc


def _diffusers_class_from_config(class_name: str, config: Path):
    if not config.is_file():
        raise ModelSpecError(f"config file {config} (from spec '{class_name}:{config}') does not exist")
    cls = _diffusers_class(class_name)
    cfg = _read_config(config)
    if not hasattr(cls, "from_config"):
        raise ModelSpecError(f"diffusers.{class_name} cannot be built from a config (no from_config)")
    return cls.from_config(cfg).eval()


def _from_path(path: Path):
    if path.is_file():
        if path.suffix != ".json":
            raise ModelSpecError(f"{path} is a file but not a config JSON; expected {SPEC_HELP}")
        name = _read_config(path).get("_class_name")
        if not name:
            raise ModelSpecError(f"{path} has no '_class_name'; use 'DiffusersClass:{path}' to say which class it configures")
        return _diffusers_class_from_config(name, path)
    if (path / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    if (path / "config.json").is_file():
        name = _read_config(path / "config.json").get("_class_name")
        if not name:
            raise ModelSpecError(f"{path}/config.json has no '_class_name'; expected a diffusers model directory")
        cls = _diffusers_class(name)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if not has_weights:
            raise ModelSpecError(f"{path} has a config.json but no weights (*.safetensors / *.bin); "
                                 f"for a random init from the config use '{name}:{path / 'config.json'}'")
        try:
            return cls.from_pretrained(str(path), local_files_only=True).eval()
        except ValueError:  # e.g. Wan's fp32-kept modules need `accelerate` for from_pretrained (low_cpu_mem_usage)
            if available("accelerate"):  # told by the install, not by diffusers' message text
                raise
            return _from_config_and_safetensors(cls, path)
    raise ModelSpecError(f"directory {path} has neither model_index.json (pipeline) nor config.json (model)")


def _from_config_and_safetensors(cls, path: Path):
    """Build ``cls`` from ``path/config.json`` and load every ``*.safetensors`` shard strictly."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSpecError(f"{path}: cannot load without `accelerate` unless the weights are *.safetensors files")
    model = cls.from_config(_read_config(path / "config.json"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _import_file(file: Path):
    """Import ``file`` under its own stem (so classes keep the module name a normal import gives them:
    plans record the model class), reusing an already imported module of the same file."""
    import sys

    if not file.is_file():
        raise ModelSpecError(f"factory file {file} does not exist")
    name = file.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == file.resolve():
            return existing
        name = f"_vdit_model_spec_{name}"
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _import(module: str):
    if module.endswith(".py"):
        return _import_file(Path(module))
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import module {module!r} for spec '{module}:...': {exc}") from exc


def _factory(module: str, attr: str) -> tuple[Any, dict | None]:
    mod = _import(module)
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ModelSpecError(f"module {module!r} has no callable {attr!r}")
    obj = fn()
    example = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], dict):
        obj, example = obj
    if not isinstance(obj, torch.nn.Module) and not isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        raise ModelSpecError(f"{module}:{attr}() returned {type(obj).__name__}; expected an nn.Module, a pipeline "
                             "with a .transformer, or (module, example_inputs dict)")
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    return obj, example


def load_example_inputs(path) -> dict:
    """The first forward-kwargs dict of an ``--inputs`` file (see :func:`load_input_list`)."""
    return load_input_list(path)[0]


def load_input_list(path) -> list[dict]:
    """A list of forward-kwargs dicts (``torch.save``'d dict or list of dicts): bare-module calibration data."""
    from ..validation import looks_like_text

    if Path(path).is_dir():
        raise ModelSpecError(f"inputs file {path}: expected a torch.save'd file of forward kwargs, found a directory")
    if not Path(path).is_file():
        raise ModelSpecError(f"inputs file {path} does not exist")
    if looks_like_text(Path(path)):
        raise ModelSpecError(f"inputs file {path}: expected a torch.save'd dict (or list of dicts) of forward kwargs, "
                             "found a text file (prompts go to --prompts)")
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors name no file: say which one and what it should be
        raise ModelSpecError(f"inputs file {path}: expected a torch.save'd dict (or list of dicts) of forward kwargs, "
                             f"cannot read it ({type(exc).__name__}: {exc})") from None
    items = [obj] if isinstance(obj, dict) else obj
    if not isinstance(items, list) or not items or not all(isinstance(o, dict) for o in items):
        raise ModelSpecError(f"inputs file {path} must hold a dict of forward kwargs or a non-empty list of them")
    return items


# ---------------------------------------------------------------- shared by the inspect/calibrate commands
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def is_pipeline(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "transformer", None), torch.nn.Module)


def move_inputs(obj: Any, device, dtype=None, _key: str = "") -> Any:
    """Recursively move tensors to ``device``; floating tensors also to ``dtype`` when given,
    except timesteps (kept in full precision: the models embed them themselves)."""
    if isinstance(obj, torch.Tensor):
        cast = dtype is not None and obj.is_floating_point() and "timestep" not in _key
        return obj.to(device=device, dtype=dtype) if cast else obj.to(device)
    if isinstance(obj, dict):
        return {k: move_inputs(v, device, dtype, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_inputs(v, device, dtype, _key) for v in obj)
    return obj
