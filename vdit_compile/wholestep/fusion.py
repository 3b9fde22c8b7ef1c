"""Fused q/k/v projections, through diffusers' own ``fuse_qkv_projections``, before FP8 and the compile.

Why: each attention reads its input three times (``to_q``, ``to_k``, ``to_v``); with FP8 linears each of the three
also quantises that same input (a read and a write of ``M x hidden`` per linear at 86,400 tokens), and three GEMMs
of ``N = hidden`` run where one of ``N = 3 x hidden`` would do.  diffusers concatenates the weights into one
``to_qkv`` (``to_kv`` for cross-attention, whose queries come from other tokens; ``to_added_kv`` for image keys)
and its processors use it while ``fused_projections`` is set.  The math is the same linear map (row-wise
activation scales and per-output-channel weight scales are unchanged under FP8); outputs may differ by GEMM
accumulation order only.  Opt-in (``OptimizeConfig.fuse_qkv``) until a GPU run times it.
"""
from __future__ import annotations

import warnings

import torch

#: Linears a fused projection replaces (unused while fused), per fused attribute.
REPLACED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"), "to_added_kv": ("add_k_proj", "add_v_proj")}


def _adapter_layers(module: torch.nn.Module) -> list[str]:
    """Names of linears that carry PEFT adapters (a LoRA): fusing would stack their base weights and drop the adapter."""
    return [n for n, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


def fuse_qkv(module: torch.nn.Module) -> list[str] | None:
    """Fuse ``module``'s attention projections; returns the names of the linears the fused ones replace, or ``None``
    (with a warning, nothing changed) where the model cannot fuse them or carries LoRA adapters."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    if fuse is None:
        warnings.warn(f"vdit-compile: fuse_qkv: {type(module).__name__} has no fuse_qkv_projections() (a diffusers "
                      "model method); its projections stay unfused", stacklevel=3)
        return None
    adapters = _adapter_layers(module)
    if adapters:
        warnings.warn(f"vdit-compile: fuse_qkv: {len(adapters)} linears carry LoRA adapters (e.g. {adapters[0]}); "
                      "fusing would drop them, so the projections stay unfused (fuse_lora() first, then optimize)",
                      stacklevel=3)
        return None
    try:
        fuse()
    except (ValueError, NotImplementedError, AttributeError) as exc:
        unfuse_qkv(module)
        warnings.warn(f"vdit-compile: fuse_qkv: {type(module).__name__}.fuse_qkv_projections() failed ({exc}); its "
                      "projections stay unfused", stacklevel=3)
        return None
    replaced = []
    for name, m in module.named_modules():
        if getattr(m, "fused_projections", False):
            for fused, originals in REPLACED.items():
                if isinstance(getattr(m, fused, None), torch.nn.Linear):
                    replaced += [f"{name}.{o}" if name else o for o in originals]
    if not replaced:
        warnings.warn(f"vdit-compile: fuse_qkv: {type(module).__name__} fused no projection (none of its attention "
                      "modules supports it)", stacklevel=3)
    return replaced


def unfuse_qkv(module: torch.nn.Module) -> None:
    """Undo :func:`fuse_qkv` (the fused linears are dropped; the original ones were never changed)."""
    unfuse = getattr(module, "unfuse_qkv_projections", None)
    if unfuse is not None:
        unfuse()


class FusedGuard:
    """Refuses a forward once a replaced linear was swapped out (e.g. by ``load_lora_weights``, which wraps ``to_q``):
    the fused projection would not see the change, and the output would silently ignore the adapter."""

    def __init__(self, module: torch.nn.Module, replaced: list[str]):
        self.module = module
        self.originals = {n: module.get_submodule(n) for n in replaced}
        self.handle = module.register_forward_pre_hook(self._check)

    def _check(self, *_):
        changed = [n for n, m in self.originals.items() if self.module.get_submodule(n) is not m]
        if changed:
            raise RuntimeError(f"vdit-compile: {changed[0]} (and {len(changed) - 1} more) changed after optimize(..., "
                               "fuse_qkv=True), e.g. a LoRA was loaded; the fused projections do not see it. Call "
                               "vdit_compile.restore(...) and optimize again after loading adapters (or fuse_lora() first)")

    def remove(self) -> None:
        self.handle.remove()
