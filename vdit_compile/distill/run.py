"""``python tools/distill.py``: check every input, then run MLCD -> masks -> KD, then the scorecard.

Everything that can be wrong with the inputs (unknown model, missing or empty prompts file, a plan for
another model, segments that do not divide the teacher's steps, an existing output directory, a corrupt
checkpoint on ``--resume``) is found by :func:`preflight` *before* the first training step.

Multi-GPU: launch with ``torchrun --nproc-per-node R tools/distill.py ...``; each rank trains on its slice
of the global batch under DDP (NCCL on CUDA, gloo on CPU); rank 0 writes files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write_text, latest_checkpoint, verify_checkpoint
from .config import DistillConfig, DistillConfigError, build_arg_parser, resolve_config
from .loading import load_adapter
from .pool import build_pool
from .schedule import FewStepSchedule
from .stages import RunContext, stage_kd, stage_masks, stage_mlcd
from .trainer import Interrupted, autocast_factory

log = logging.getLogger("vdit_compile.distill")


def read_prompts(path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise DistillConfigError(f"prompts file {path} holds no prompts (expected one prompt a line)")
    return prompts


def resolve_device(cfg: DistillConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillConfigError(f"--device {cfg.device} asked for CUDA but no GPU is visible")
    return dev


def prepare_out_dir(cfg: DistillConfig, overwrite: bool) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DistillConfigError(
                f"output directory {out} already exists and is not empty: pass --overwrite to replace it, "
                f"or --resume {out} to continue it"
            )
    return out


def preflight(cfg: DistillConfig, run_dir: Path, resuming: bool, device) -> tuple:
    """All input checks; returns ``(adapter, schedule, prompts)``.  Raises before anything is trained."""
    cfg.validate()
    if resuming:
        ck = latest_checkpoint(run_dir)
        if ck is not None:
            verify_checkpoint(ck)
        for stage in cfg.stage_list():
            w = run_dir / stage / "weights.safetensors"
            if (run_dir / stage / "done.json").is_file() and stage != "masks" and not w.is_file():
                raise CheckpointError(f"{run_dir}: stage {stage} is marked done but {w} is missing")
    try:
        adapter = load_adapter(cfg.model, device=device, latent_shape=cfg.extra.get("latent_shape"))
    except DistillConfigError:
        raise
    except Exception as exc:
        raise DistillConfigError(f"cannot load model {cfg.model!r}: {exc}") from exc
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
        prompts = [prompts[i % len(prompts)] for i in range(cfg.pool_size)]
    else:
        prompts = adapter.sample_prompts(cfg.pool_size, cfg.seed)
    if cfg.plan and ("masks" in cfg.stage_list()):
        from .sparse import check_plan

        try:
            check_plan(cfg.plan, adapter)
        except Exception as exc:
            raise DistillConfigError(f"plan {cfg.plan} does not fit model {cfg.model!r}: {exc}") from exc
    schedule = FewStepSchedule.from_adapter(adapter, cfg.teacher_steps, cfg.segments)
    for steps in cfg.steps_list():
        schedule.check_steps(steps)
    return adapter, schedule, prompts


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def run(cfg: DistillConfig, resuming: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Run (or continue) a distillation; returns the run directory."""
    device = resolve_device(cfg)
    rank, world = _init_distributed(device)
    run_dir = Path(cfg.out)
    if not resuming:
        prepare_out_dir(cfg, overwrite)
    adapter, schedule, prompts = preflight(cfg, run_dir, resuming, device)
    guidance = adapter.default_guidance if cfg.guidance_scale is None else float(cfg.guidance_scale)
    if rank == 0:
        if not resuming and run_dir.exists() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        sched = schedule.to_dict() | {"guidance_scale": guidance, "student_cfg": cfg.student_cfg, "teacher_steps": cfg.teacher_steps,
                                      "sample_steps": cfg.steps_list(), "mapping": {str(s): schedule.plan(s) for s in cfg.steps_list()}}
        atomic_write_text(run_dir / "schedule.json", json.dumps(sched, indent=2) + "\n")
    if world > 1:
        torch.distributed.barrier()
    torch.manual_seed(cfg.seed)
    autocast = autocast_factory(device, cfg.precision)
    ctx = RunContext(cfg, run_dir, adapter, schedule, device, autocast, rank=rank, world=world, progress=progress)
    ctx.calib_prompts = prompts[: cfg.calib_prompts]

    def make_pool():
        t0 = time.perf_counter()
        # the teacher runs in fp32, as its own pipeline does: the pool is the exact reference trajectory
        pool = build_pool(adapter, prompts, schedule, guidance, cfg.seed, device, batch=cfg.batch_size, autocast=None,
                          progress=progress and rank == 0)
        ctx.timings["pool"] = {"seconds": time.perf_counter() - t0, "trajectories": len(pool), "bytes": pool.nbytes()}
        return pool

    ctx.pool_factory = make_pool
    stages = cfg.stage_list()
    dense = stage_mlcd(ctx) if "mlcd" in stages else adapter.transformer
    sparse = None
    if "masks" in stages:
        sparse = stage_masks(ctx, dense)
    if "kd" in stages:
        if sparse is None:
            raise DistillConfigError("the kd stage needs the masks stage's plan: include masks in --stages")
        sparse = stage_kd(ctx, dense, sparse)
    if rank == 0:
        _write_timings(run_dir, ctx.timings)
        from .report import plot_losses

        plot_losses(run_dir)
        if cfg.eval:
            from .report import final_scorecard

            final_scorecard(run_dir, adapter, device)
    return run_dir


def _write_timings(run_dir: Path, timings: dict) -> None:
    path = run_dir / "timings.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for stage in ("mlcd", "masks", "kd"):
        f = run_dir / stage / "done.json"
        if f.is_file():
            old[stage] = json.loads(f.read_text())
    old.update({k: v for k, v in timings.items() if k == "pool"})
    atomic_write_text(path, json.dumps(old, indent=2) + "\n")


def _raise_interrupted(signum, frame):
    """Outside the training loops (pool, calibration, scoring) a signal stops the run at once: no step is lost."""
    raise Interrupted(signum, "(no training step in progress; nothing to save)")


def main(argv: list[str] | None = None) -> int:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    cfg = None
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.resume:
            given = [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--") and a not in ("--resume",)]
            if given:
                raise DistillConfigError(f"--resume takes the run's own config.json; do not pass other options (found {given})")
            cfg = DistillConfig.load(Path(args.resume) / "config.json")
            cfg.out = str(args.resume)
            run(cfg, resuming=True)
        else:
            cfg = resolve_config(args)
            run(cfg, resuming=False, overwrite=args.overwrite)
    except (DistillConfigError, CheckpointError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        where = cfg.out if cfg is not None else "RUN_DIR"
        print(f"distill: {exc}; continue with --resume {where}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
