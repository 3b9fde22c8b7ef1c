"""The three stages, each a function of a :class:`RunContext`: MLCD -> masks -> KD.

Each stage writes ``RUN/<stage>/done.json`` when finished (with its timings); a resumed run skips
finished stages and reloads their outputs, and continues the unfinished one from its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import atomic_write_text, latest_checkpoint, save_weights
from .losses import kd_loss, mlcd_loss
from .trainer import StageTrainer, ema_update


@dataclass
class RunContext:
    cfg: object
    run_dir: Path
    adapter: object
    schedule: object
    device: torch.device
    autocast: object
    pool: object = None
    pool_factory: object = None
    rank: int = 0
    world: int = 1
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def get_pool(self):
        if self.pool is None:
            self.pool = self.pool_factory()
        return self.pool

    def done(self, stage: str) -> bool:
        return (self.run_dir / stage / "done.json").is_file()

    def mark_done(self, stage: str, info: dict) -> None:
        self.timings[stage] = info
        if self.rank == 0:
            atomic_write_text(self.run_dir / stage / "done.json", json.dumps(info, indent=2) + "\n")

    def resume_point(self, stage: str) -> Path | None:
        ck = latest_checkpoint(self.run_dir)
        if ck is None:
            return None
        meta = json.loads((ck / "meta.json").read_text())
        return ck if meta["stage"] == stage else None


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(module)
    m.requires_grad_(False)
    return m.eval()


def _draw(schedule, pool_size, visited=(), visited_fraction: float = 0.0):
    """Training points: a pool trajectory and a teacher index ``n`` for each row of the batch.

    ``n`` is uniform over the ``N`` teacher indices, except that a ``visited_fraction`` share of the rows
    (the first ``round(fraction * B)``) is drawn from ``visited``: the indices the few-step samplers start
    their steps from.  Those are the only points a trained student is ever evaluated at, and under a
    uniform draw they are ``S/N`` of the batch (1/6 for S = 8 of 48), so a short run spends most of its
    capacity on jumps it will never make.  The other rows keep the consistency property over the whole
    segment, which is what makes 2S-step sampling and the consistency target (evaluated at ``n + skip``)
    meaningful.
    """
    N = schedule.num_teacher_steps
    vis = torch.tensor(sorted(set(int(i) for i in visited if 0 <= int(i) < N)), dtype=torch.long)

    def draw(gen, B):
        idx = torch.randint(pool_size, (B,), generator=gen)
        n = torch.randint(N, (B,), generator=gen)
        k = int(round(visited_fraction * B)) if len(vis) else 0
        if k:
            n[:k] = vis[torch.randint(len(vis), (k,), generator=gen)]
        return idx, n

    return draw


def _visited(ctx: RunContext) -> list[int]:
    """Teacher indices where the S- and 2S-step samplers (``cfg.steps_list()``) call the student."""
    out = set()
    for steps in ctx.cfg.steps_list():
        out.update(ctx.schedule.indices(steps)[:-1])
    return sorted(out)


def _maybe_compile(module, cfg):
    if not cfg.compile:
        return module
    return torch.compile(module)


def load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path), device=str(next(module.parameters()).device)))
    return module


# ------------------------------------------------------------------------------------------------
def stage_mlcd(ctx: RunContext) -> torch.nn.Module:
    """Multi-step consistency distillation; returns the dense few-step student (EMA weights)."""
    cfg, out = ctx.cfg, ctx.run_dir / "mlcd" / "weights.safetensors"
    base = ctx.adapter.transformer
    if ctx.done("mlcd"):
        return load_weights(_frozen_copy(base), out)
    t0 = time.perf_counter()
    pool = ctx.get_pool()
    student = copy.deepcopy(base).train().requires_grad_(True)
    if cfg.grad_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    target, ema = _frozen_copy(base), _frozen_copy(base)
    tgt_fwd = _maybe_compile(target, cfg)

    def loss_fn(model, idx, n):
        return mlcd_loss(ctx.adapter, model, tgt_fwd, pool, ctx.schedule, idx, n, cfg, ctx.autocast)

    def after(step):
        ema_update(target, student, cfg.target_decay)
        ema_update(ema, student, cfg.ema_decay)

    tr = StageTrainer("mlcd", ctx.run_dir, student, {"target": target, "ema": ema}, loss_fn,
                      _draw(ctx.schedule, len(pool), _visited(ctx), cfg.visited_fraction),
                      after, cfg.mlcd_steps, cfg.lr, cfg, ctx.device, compile=cfg.compile,
                      max_seconds=60 * cfg.mlcd_max_minutes)
    ck = ctx.resume_point("mlcd")
    if ck is not None:
        tr.restore(ck)
    tr.run(progress=ctx.progress)
    if ctx.rank == 0:
        save_weights(out, ema, {"stage": "mlcd", "steps": tr.step})
    ctx.mark_done("mlcd", {"train_seconds": tr.train_seconds, "stage_seconds": time.perf_counter() - t0, "steps": tr.step,
                           "stopped_early_by_time_budget": tr.stopped_early,
                           "steps_fitted_to_time_box": tr.auto_total,
                           "final_loss": tr.history[-1]["loss"] if tr.history else None})
    return ema.requires_grad_(False).eval()


def record_calibration_inputs(ctx: RunContext, dense: torch.nn.Module) -> list[dict]:
    """The dense few-step model's transformer inputs while it samples the calibration prompts."""
    from vdit_compile.calibration.inputs import TransformerInputRecorder

    from .pool import noise_for
    from .schedule import few_step_sample, student_guidance

    cfg = ctx.cfg
    prompts = ctx.calib_prompts if hasattr(ctx, "calib_prompts") else None
    prompts = prompts or ctx.get_pool().prompts[: cfg.calib_prompts]
    noise = noise_for(cfg.seed + 1, len(prompts), ctx.adapter.latent_shape(), ctx.device)
    cond = ctx.adapter.encode(prompts, ctx.device)
    records = []
    for steps in cfg.steps_list():
        with TransformerInputRecorder(dense, device=ctx.device) as rec:
            few_step_sample(ctx.adapter, dense, ctx.schedule, noise, cond, steps, autocast=ctx.autocast,
                            guidance=student_guidance(cfg, ctx.adapter))
        records += rec.records
    return records


def stage_masks(ctx: RunContext, dense: torch.nn.Module):
    """Calibrate tile masks on the few-step model (or apply ``--plan``); returns the sparse copy."""
    from .sparse import apply_plan, calibrate_plan, relative_error

    cfg = ctx.cfg
    plan_path = ctx.run_dir / "masks" / "plan.json"
    sparse = copy.deepcopy(dense)
    if ctx.done("masks"):
        return apply_plan(sparse, plan_path, ctx.adapter, backend=cfg.kd_backend)
    t0 = time.perf_counter()
    records = record_calibration_inputs(ctx, dense)
    if ctx.rank == 0:
        if cfg.plan:
            import shutil

            plan_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cfg.plan, plan_path)
        else:
            calibrate_plan(copy.deepcopy(dense), records, cfg, plan_path)
    if ctx.world > 1:
        torch.distributed.barrier()
    sparse = apply_plan(sparse, plan_path, ctx.adapter, backend=cfg.kd_backend)
    err = relative_error(ctx.adapter, dense, sparse, records, ctx.autocast)
    info = {"stage_seconds": time.perf_counter() - t0, "calib_inputs": len(records), "rel_err_velocity": err}
    info.update(_plan_summary(plan_path))
    ctx.mark_done("masks", info)
    return sparse


def _plan_summary(plan_path: Path) -> dict:
    from vdit_compile.plans import Plan

    plan = Plan.load(plan_path)
    tiled = plan.tiled_sites()
    dens = [s.density for s in tiled]
    return {"tiled_sites": len(tiled), "mean_density": (sum(dens) / len(dens)) if dens else 1.0}


def stage_kd(ctx: RunContext, dense: torch.nn.Module, sparse: torch.nn.Module) -> torch.nn.Module:
    """Train the sparse student (masks fixed) to match the dense few-step model; returns it (EMA weights)."""
    cfg, out = ctx.cfg, ctx.run_dir / "kd" / "weights.safetensors"
    if ctx.done("kd"):
        return load_weights(sparse, out)
    t0 = time.perf_counter()
    pool = ctx.get_pool()
    sparse.train().requires_grad_(True)
    ema = _frozen_copy(dense)
    frozen = _frozen_copy(dense)

    def loss_fn(model, idx, n):
        return kd_loss(ctx.adapter, model, frozen, pool, ctx.schedule, idx, n, cfg, ctx.autocast)

    def after(step):
        ema_update(ema, sparse, cfg.ema_decay)

    tr = StageTrainer("kd", ctx.run_dir, sparse, {"ema": ema}, loss_fn,
                      _draw(ctx.schedule, len(pool), _visited(ctx), cfg.visited_fraction), after, cfg.kd_steps, cfg.kd_lr, cfg, ctx.device, max_seconds=60 * cfg.kd_max_minutes)
    ck = ctx.resume_point("kd")
    if ck is not None:
        tr.restore(ck)
    tr.run(progress=ctx.progress)
    if ctx.rank == 0:
        save_weights(out, ema, {"stage": "kd", "steps": tr.step})
    ctx.mark_done("kd", {"train_seconds": tr.train_seconds, "stage_seconds": time.perf_counter() - t0, "steps": tr.step,
                         "stopped_early_by_time_budget": tr.stopped_early,
                         "steps_fitted_to_time_box": tr.auto_total,
                         "final_loss": tr.history[-1]["loss"] if tr.history else None})
    with torch.no_grad():
        for ps, pe in zip(sparse.parameters(), ema.parameters()):
            ps.copy_(pe)
    return sparse.eval().requires_grad_(False)
