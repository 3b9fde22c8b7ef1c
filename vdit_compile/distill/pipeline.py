"""The few-step pipeline that ships with a distillation result, and :func:`load_run`.

``FewStepPipeline(prompt, num_inference_steps=S, generator=g).frames`` samples with the distilled
student in ``S`` steps (or ``2S``, any ``S m`` the schedule allows; see
:mod:`vdit_compile.distill.schedule` for the timestep mapping).  Guidance is *baked in* by default: the
student was trained on the teacher's CFG trajectories at the run's ``guidance_scale`` and is called once
per step on the conditional embeddings only; a different ``guidance_scale`` argument is ignored with a
warning.  A ``--student-cfg`` run guides itself (both branches in one batched call per step) at the run's
scale, or at the ``guidance_scale`` argument when one is given (it was trained at the run's scale only).

A run directory (or a shipped copy of one, see :func:`export_run`) holds ``config.json``,
``schedule.json``, the weights of the last finished stage and, after the masks stage, ``masks/plan.json``.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DistillConfig
from .loading import load_adapter
from .schedule import FewStepSchedule, few_step_sample

log = logging.getLogger(__name__)

#: shipped results (``export_run`` copies of the GPU runs on the embedded model): ``weights/embedded-s<S>/``
SHIPPED_DIR = Path(__file__).parent / "weights"

#: stage -> weights file inside a run, newest stage first (load_run takes the first that exists)
STAGE_WEIGHTS = (("kd", "kd/weights.safetensors"), ("masks", "mlcd/weights.safetensors"), ("mlcd", "mlcd/weights.safetensors"))


@dataclass
class FewStepOutput:
    frames: torch.Tensor  # (B, T, 3, H, W) in [0, 1]
    latents: torch.Tensor


class FewStepPipeline:
    """Samples with a distilled student in a few steps; guidance baked in or, ``student_cfg``, applied by the student."""

    def __init__(self, adapter, transformer, schedule: FewStepSchedule, guidance_scale: float, default_steps: int,
                 stage: str = "mlcd", sparse: bool = False, autocast=None, student_cfg: bool = False):
        self.adapter, self.transformer, self.schedule = adapter, transformer, schedule
        self.guidance_scale, self.default_steps, self.stage, self.sparse = guidance_scale, default_steps, stage, sparse
        self.autocast, self.student_cfg = autocast, student_cfg

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device) -> "FewStepPipeline":
        self.transformer.to(device)
        if hasattr(self.adapter, "to"):
            self.adapter.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None, **kwargs) -> FewStepOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = self.schedule.check_steps(num_inference_steps or self.default_steps)
        guidance = None
        if self.student_cfg:
            guidance = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        elif guidance_scale is not None and abs(float(guidance_scale) - self.guidance_scale) > 1e-6:
            log.warning("guidance is baked into this few-step model at scale %.2f; guidance_scale=%s ignored",
                        self.guidance_scale, guidance_scale)
        device = self.device
        shape = tuple(self.adapter.latent_shape())
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * len(prompts)
            if len(gens) != len(prompts):
                raise ValueError(f"{len(gens)} generators for {len(prompts)} prompts")
            latents = torch.stack([torch.randn(shape, generator=g, device=g.device if g is not None else "cpu") for g in gens]).to(device)
        cond = self.adapter.encode(prompts, device)
        self.transformer.eval()
        x = few_step_sample(self.adapter, self.transformer, self.schedule, latents.float(), cond, steps, autocast=self.autocast,
                            guidance=guidance)
        return FewStepOutput(frames=self.adapter.decode(x).clamp(0, 1), latents=x)


def _stage_weights(run_dir: Path, cfg: DistillConfig) -> tuple[str, Path]:
    for stage, rel in STAGE_WEIGHTS:
        if stage in cfg.stage_list() and (run_dir / rel).is_file() and (stage != "masks" or (run_dir / "masks" / "plan.json").is_file()):
            return stage, run_dir / rel
    raise FileNotFoundError(f"{run_dir} holds no finished stage's weights (looked for {[r for _, r in STAGE_WEIGHTS]})")


def load_run(run_dir, device="cpu", stage: str | None = None, sparse: bool | None = None,
             precision: str = "fp32", backend: str = "auto") -> FewStepPipeline:
    """The few-step pipeline of a finished (or partly finished) run, on ``device``.

    ``stage`` picks an earlier stage's result ("mlcd", "masks", "kd"); by default the last finished one.
    After the masks stage the transformer is rewritten with the run's plan (tile-sparse attention).
    ``precision``: "fp32" (default, the same as the teacher pipeline, so timings compare like for like)
    or "bf16" (autocast on CUDA).  ``backend``: the core's backend for the rewritten graph ("auto": inductor
    on CUDA; "eager": the graph runs as captured, the tile op on its Triton kernel).
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = DistillConfig.load(run_dir / "config.json")
    schedule = FewStepSchedule.from_dict(json.loads((run_dir / "schedule.json").read_text()))
    if stage is None:
        stage, wpath = _stage_weights(run_dir, cfg)
    else:
        rel = dict(STAGE_WEIGHTS)[stage]
        wpath = run_dir / rel
        if not wpath.is_file():
            raise FileNotFoundError(f"stage {stage!r} of {run_dir} has no weights at {wpath}")
    adapter = load_adapter(cfg.model, device=device, latent_shape=cfg.extra.get("latent_shape"))
    transformer = adapter.transformer
    transformer.load_state_dict(load_file(str(wpath), device=str(device)))
    use_sparse = stage in ("masks", "kd") if sparse is None else sparse
    if use_sparse:
        from .sparse import apply_plan

        plan_path = run_dir / "masks" / "plan.json"
        if not plan_path.is_file():
            raise FileNotFoundError(f"{run_dir} has no masks/plan.json: run the masks stage or pass sparse=False")
        transformer = apply_plan(transformer, plan_path, adapter, backend=backend)
    guidance = json.loads((run_dir / "schedule.json").read_text()).get("guidance_scale", adapter.default_guidance)
    from .trainer import autocast_factory

    return FewStepPipeline(adapter, transformer, schedule, guidance, cfg.segments, stage=stage, sparse=use_sparse,
                           autocast=autocast_factory(torch.device(device), precision), student_cfg=cfg.student_cfg)


def export_run(run_dir, dest, stage: str | None = None) -> Path:
    """Copy what :func:`load_run` needs (config, schedule, final weights, plan) into ``dest`` (small, shippable)."""
    run_dir, dest = Path(run_dir), Path(dest)
    cfg = DistillConfig.load(run_dir / "config.json")
    stage, wpath = _stage_weights(run_dir, cfg) if stage is None else (stage, run_dir / dict(STAGE_WEIGHTS)[stage])
    dest.mkdir(parents=True, exist_ok=True)
    for rel in ("config.json", "schedule.json"):
        shutil.copy2(run_dir / rel, dest / rel)
    (dest / wpath.parent.name).mkdir(exist_ok=True)
    shutil.copy2(wpath, dest / wpath.relative_to(run_dir))
    if stage in ("masks", "kd"):
        (dest / "masks").mkdir(exist_ok=True)
        shutil.copy2(run_dir / "masks" / "plan.json", dest / "masks" / "plan.json")
    for extra in ("scorecard.json", "scorecard.md"):
        if (run_dir / extra).is_file():
            shutil.copy2(run_dir / extra, dest / extra)
    return dest


def shipped_runs() -> dict[int, Path]:
    """Segment count -> directory of the few-step models shipped in the package (may be empty)."""
    out = {}
    for d in sorted(SHIPPED_DIR.glob("embedded-s*")):
        if (d / "config.json").is_file() and d.name[len("embedded-s"):].isdigit():
            out[int(d.name[len("embedded-s"):])] = d
    return out


#: the shipped model ``vdit-compile demo --fast`` uses when several are shipped
DEFAULT_SHIPPED_SEGMENTS = 4


def shipped_run(segments: int | None = None) -> Path:
    """Directory of a shipped few-step model (default: ``DEFAULT_SHIPPED_SEGMENTS``, else the only one)."""
    runs = shipped_runs()
    if segments is None:
        segments = DEFAULT_SHIPPED_SEGMENTS if DEFAULT_SHIPPED_SEGMENTS in runs else (min(runs) if runs else None)
    if segments not in runs:
        raise FileNotFoundError(f"no shipped few-step model with {segments} segments in {SHIPPED_DIR} "
                                f"(shipped: {sorted(runs) or 'none'}); distil one with tools/distill.py")
    return runs[segments]


def load_shipped(segments: int | None = None, device="cpu", **kw) -> FewStepPipeline:
    """The shipped few-step model of the embedded default with ``segments`` steps (``vdit-compile demo --fast``)."""
    return load_run(shipped_run(segments), device=device, **kw)
