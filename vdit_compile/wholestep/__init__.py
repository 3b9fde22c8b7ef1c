"""The whole denoising step, not only attention: FP8 linears and step caching composed with ``optimize``.

``optimize(pipe, ..., fp8="auto", cache="taylorseer")`` runs the tile rewrite as before, then (this
package, called from :mod:`vdit_compile.api`):

0. optionally (``fuse_qkv``) q/k/v projections fused into one linear each (:mod:`.fusion`, diffusers' own);
1. FP8 linears (:mod:`.fp8`): chosen per linear (role, sizes, error check), swapped through torchao
   before the transformer is first compiled in apply mode, so inductor fuses the quantisation;
2. step caching (:mod:`.caching`): a policy wrapped around the compiled forward.

:func:`report_of` says which linears run in FP8 and which were kept (and why), the cache policy and how
many transformer evaluations each sample took.  ``restore`` undoes both (original weights back, hooks
removed).  LoRA after ``optimize``: see :mod:`.lora`.
"""
from __future__ import annotations

import torch

from .caching import StepCache
from .fp8 import (
    Fp8Linears,
    choose_linears,
    normalize_mode,
    record_activations,
    resolve_mode,
)
from .fusion import FusedGuard, fuse_qkv, unfuse_qkv

__all__ = ["WholeStep", "attach", "detach", "report_of", "reset_cache"]


class WholeStep:
    """What this package applied to one optimised model (kept on its ``OptimizeState``)."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.module = module
        self.fused: list[str] | None = None  # linears replaced by fused projections (fuse_qkv), None = not fused
        self.fused_guard: FusedGuard | None = None
        self.fp8: Fp8Linears | None = None
        self.fp8_requested = "off"
        self.fp8_note = ""
        self.cache: StepCache | None = None

    def report(self) -> dict:
        fp8 = {"requested": self.fp8_requested, "mode": "off", "note": self.fp8_note}
        if self.fp8 is not None:
            fp8.update(self.fp8.choice.as_dict())
        cache = None
        if self.cache is not None:
            cache = {"policy": self.cache.policy, "threshold": self.cache.threshold, "warmup": self.cache.warmup,
                     "order": self.cache.order, **self.cache.stats.as_dict()}
        fused = None if self.fused is None else {"replaced_linears": len(self.fused)}
        return {"fp8": fp8, "cache": cache, "fuse_qkv": fused}

    def undo(self) -> None:
        if self.cache is not None:
            self.cache.detach()
        if self.fp8 is not None:
            self.fp8.undo()
        if self.fused_guard is not None:
            self.fused_guard.remove()
            self.fused_guard = None
        if self.fused is not None and self.module is not None:
            unfuse_qkv(self.module)
            self.fused = None


def _device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_fp8(module: torch.nn.Module, cfg, example_call=None) -> WholeStep:
    """Step 1 (before the apply-mode compile): fuse q/k/v projections if asked, choose and swap the FP8 linears;
    returns the record."""
    ws = WholeStep(module)
    if getattr(cfg, "fuse_qkv", False):
        ws.fused = fuse_qkv(module)
        if ws.fused:
            ws.fused_guard = FusedGuard(module, ws.fused)
    requested = normalize_mode(getattr(cfg, "fp8", "off"))
    ws.fp8_requested = requested
    mode, why = resolve_mode(requested, _device(module))
    ws.fp8_note = why
    if mode == "off":
        return ws
    if mode == "on" and getattr(cfg, "backend", "auto") == "eager":
        import warnings

        warnings.warn("vdit-compile: fp8 with backend='eager' quantises activations unfused (often slower than "
                      "bf16); use backend='auto' or 'inductor' so that inductor fuses the quantisation", stacklevel=3)
    acts = None
    if example_call is not None:
        acts = record_activations(module, lambda: example_call(type(module).forward.__get__(module)))
    choice = choose_linears(module, mode, keep=cfg.fp8_keep or (), max_error=cfg.fp8_max_error, activations=acts,
                            unused=ws.fused or ())
    ws.fp8 = Fp8Linears(module, choice).apply()
    return ws


def attach(module: torch.nn.Module, state, cfg, example_call=None) -> WholeStep | None:
    """Apply FP8 (before the apply-mode install) — see :func:`prepare_fp8`; returns the record on ``state``."""
    if (normalize_mode(getattr(cfg, "fp8", "off")) == "off" and getattr(cfg, "cache", None) is None
            and not getattr(cfg, "fuse_qkv", False)):
        return None
    ws = prepare_fp8(module, cfg, example_call)
    state.wholestep = ws
    return ws


def attach_cache(module: torch.nn.Module, state, cfg) -> None:
    """Step 2 (after the apply-mode install): wrap the compiled forward with the cache policy."""
    ws = getattr(state, "wholestep", None)
    if ws is None or getattr(cfg, "cache", None) is None:
        return
    ws.cache = StepCache(module, cfg.cache, cfg.cache_threshold, cfg.cache_warmup, cfg.cache_order)
    ws.cache.attach()


def detach(state) -> None:
    """Undo everything this package applied (``restore``)."""
    ws = getattr(state, "wholestep", None) if state is not None else None
    if ws is not None:
        ws.undo()
        state.wholestep = None


def _state(model_or_pipe):
    from ..capture.install import state_of

    module = model_or_pipe if isinstance(model_or_pipe, torch.nn.Module) else getattr(model_or_pipe, "transformer", None)
    return state_of(module) if isinstance(module, torch.nn.Module) else None


def report_of(model_or_pipe) -> dict | None:
    """FP8 choice and cache statistics of an optimised model (``None`` if neither was asked for)."""
    state = _state(model_or_pipe)
    ws = getattr(state, "wholestep", None) if state is not None else None
    return ws.report() if ws is not None else None


def reset_cache(model_or_pipe) -> None:
    """Forget cached outputs and statistics (e.g. between two benchmark runs)."""
    state = _state(model_or_pipe)
    ws = getattr(state, "wholestep", None) if state is not None else None
    if ws is not None and ws.cache is not None:
        ws.cache.reset()
        ws.cache.stats.samples.clear()
