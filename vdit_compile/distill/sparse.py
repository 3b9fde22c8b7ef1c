"""The masks stage's link to the core: calibrate a plan on the few-step model, apply it, measure it.

Everything here goes through the core's public API (``vdit_compile.optimize`` with ``calib_inputs`` or
``plan``), so the sparse student that KD trains is exactly the rewritten graph users run: attention
sites replaced by ``torch.ops.vdit.tile_attention`` with the plan's masks fixed, whose backward is the
Triton kernel on GPU and the exact gather reference on CPU.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _optimize():
    from vdit_compile import optimize

    return optimize


def _plan_of(module):
    """The Plan the core attached to an optimized module."""
    from vdit_compile import plan_of

    plan = plan_of(module)
    if plan is None:
        raise RuntimeError(f"vdit_compile.optimize left no plan on {type(module).__name__}")
    return plan


def calibrate_plan(module: torch.nn.Module, calib_inputs: list[dict], cfg, plan_path: Path):
    """Run the core's calibration on ``calib_inputs`` (the few-step model's own inputs); save the plan."""
    optimize = _optimize()
    overrides = {"backend": "eager"}
    if cfg.error_budget is not None:
        overrides["error_budget"] = cfg.error_budget
    if cfg.max_density is not None:
        overrides["max_density"] = cfg.max_density
    optimized = optimize(module, calib_inputs=calib_inputs, **overrides)
    plan = _plan_of(optimized)
    Path(plan_path).parent.mkdir(parents=True, exist_ok=True)
    plan.save(plan_path)
    return plan


def check_plan(plan_path, adapter) -> None:
    """Refuse a plan calibrated for another model (before any training)."""
    from vdit_compile.plans import Plan

    plan = Plan.load(plan_path)
    plan.check_compatible(adapter.transformer)


def apply_plan(module: torch.nn.Module, plan_path, adapter=None, backend: str = "auto", progress: bool = False) -> torch.nn.Module:
    """Rewrite ``module`` with the saved plan (masks fixed); parameters stay the module's own.

    ``backend="eager"`` (KD training) runs the rewritten graph without inductor; ``"auto"`` (sampling)
    lets the core pick (inductor on CUDA).  Every tiled site is rewritten (``cost_model="always"``): a
    distilled student is trained with its masks, so they are part of the model, not a speed option that a
    timing on the current device may switch off.
    """
    optimize = _optimize()
    return optimize(module, plan=str(plan_path), backend=backend, progress=progress, cost_model="always")


@torch.no_grad()
def relative_error(adapter, dense, sparse, records: list[dict], autocast) -> float:
    """Relative L2 error of the sparse model's velocity against the dense one on the calibration inputs."""
    num = den = 0.0
    for r in records:
        kw = dict(r)
        kw.pop("return_dict", None)
        with autocast():
            vd = adapter.velocity(dense, kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"]).float()
            vs = adapter.velocity(sparse, kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"]).float()
        num += float((vs - vd).pow(2).sum())
        den += float(vd.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5
