"""What ``vdit-compile score TARGET`` scores: the embedded model, a distillation run, or a model spec.

Each target resolves to a :class:`Target`: the pipeline to sample, its natural step count, and how to
get its dense many-step teacher (the reference the PSNR/SSIM are taken against).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


class TargetError(ValueError):
    """A TARGET that cannot be scored; the message says what was expected."""


@dataclass
class Target:
    pipe: object
    description: str
    default_steps: int
    teacher: Callable[[], object]  # loads the dense many-step teacher pipeline
    is_teacher: bool  # the pipeline *is* its own dense teacher (so the same settings need no second sampling)


def is_distill_run(path: Path) -> bool:
    return path.is_dir() and (path / "schedule.json").is_file() and (path / "config.json").is_file()


def _check_pipeline(obj, spec: str):
    if isinstance(obj, tuple):
        obj = obj[0]
    if not callable(obj) or not hasattr(obj, "transformer"):
        raise TargetError(
            f"{spec!r} loads a {type(obj).__name__}, not a text-to-video pipeline (an object with .transformer that "
            "is called with prompts and returns .frames); the scorecard needs a pipeline"
        )
    return obj


def resolve_target(spec: str, device: str = "cpu") -> Target:
    """``embedded`` / ``embedded:tiny`` / any model spec, or a distillation run directory."""
    path = Path(spec)
    if is_distill_run(path):
        from ..distill import load_run
        from ..distill.config import DistillConfig

        pipe = load_run(path, device=device)
        teacher_spec = DistillConfig.load(path / "config.json").model
        teacher_spec = "embedded:tiny" if teacher_spec == "tiny" else teacher_spec
        return Target(
            pipe, f"distilled run {path} (stage {getattr(pipe, 'stage', '?')}, teacher {teacher_spec})",
            getattr(pipe, "default_steps", 4), lambda: _load_spec(teacher_spec, device), is_teacher=False,
        )
    if path.is_dir() and (path / "config.json").is_file() and (path / "mlcd").exists():
        raise TargetError(f"{spec} looks like a distillation run but has no schedule.json: is the run finished?")
    pipe = _load_spec(spec, device)
    return Target(pipe, f"model {spec}", 50, lambda: pipe, is_teacher=True)


def _load_spec(spec: str, device: str):
    from ..models.spec import ModelSpecError, load_model

    try:
        obj = load_model(spec)
    except (ModelSpecError, FileNotFoundError) as exc:
        raise TargetError(
            f"cannot load TARGET {spec!r}: {exc}. Expected 'embedded', a distillation run directory "
            "(tools/distill.py --out), or a model spec"
        ) from exc
    pipe = _check_pipeline(obj, spec)
    return pipe.to(device) if hasattr(pipe, "to") else pipe


def apply_plan(pipe, plan: Optional[str]):
    """``vdit_compile.optimize(pipe, plan=plan)``; a clear error when the plan file is missing."""
    if plan is None:
        return pipe
    if not Path(plan).is_file():
        raise TargetError(f"--plan {plan}: no such file (expected a plan JSON written by `vdit-compile calibrate`)")
    from .. import optimize

    return optimize(pipe, plan=plan)
