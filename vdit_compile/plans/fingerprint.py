"""Structure fingerprint of a model: what a plan was calibrated for.

A plan names sites by module path and stores per-head masks, so it only fits a model with the
same module tree and the same parameter shapes.  The fingerprint hashes exactly that (module
names and types, parameter names and shapes), not parameter values or dtypes: a fine-tuned or
bf16-cast copy of the same architecture keeps its plan; another config does not.
"""
from __future__ import annotations

import hashlib

import torch

#: Name fragments added by wrappers (torch.compile's OptimizedModule) that are not structure.
_WRAPPER_PREFIXES = ("_orig_mod.",)


def unwrap_model(model_or_pipe) -> torch.nn.Module:
    """The ``nn.Module`` a plan is about: a pipeline's ``transformer``, a compiled module's original."""
    model = model_or_pipe
    if not isinstance(model, torch.nn.Module):
        model = getattr(model_or_pipe, "transformer", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"expected an nn.Module or a pipeline with a .transformer module, found {type(model_or_pipe).__name__}"
            )
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def model_class_name(model_or_pipe) -> str:
    """Fully qualified class name of the model, e.g. ``diffusers...transformer_wan.WanTransformer3DModel``."""
    cls = type(unwrap_model(model_or_pipe))
    return f"{cls.__module__}.{cls.__qualname__}"


def _clean(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def structure_summary(model_or_pipe) -> dict:
    """Small human-readable summary stored next to the fingerprint, to say *how* structures differ."""
    model = unwrap_model(model_or_pipe)
    return {
        "modules": sum(1 for _ in model.named_modules()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_tensors": sum(1 for _ in model.parameters()),
    }


def model_fingerprint(model_or_pipe) -> str:
    """``sha256:<hex>`` of the module tree (names, class names) and parameter names and shapes.

    Class names without their module path: the structure is the same wherever the code lives
    (the plan's ``model_class`` records the full path separately).
    """
    model = unwrap_model(model_or_pipe)
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        cls = type(mod)
        h.update(f"M {_clean(name)} {cls.__qualname__}\n".encode())
    for name, p in model.named_parameters():
        h.update(f"P {_clean(name)} {tuple(p.shape)}\n".encode())
    return "sha256:" + h.hexdigest()
