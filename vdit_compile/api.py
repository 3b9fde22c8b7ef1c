"""Public entry points: :func:`optimize`, :func:`restore`, :func:`inspect_model`.

``optimize`` finds the transformer (``pipe.transformer`` or the module itself) and routes its
forward through ``torch.compile`` with the vdit backend (:mod:`vdit_compile.capture`):

1. calibrate mode: the transformer runs on the calibration inputs (captured from the pipeline
   on ``calib_prompts``, or ``calib_inputs`` for a bare module); every 3D attention site feeds
   its ``SiteCalibrator``; a :class:`~vdit_compile.plans.Plan` is built from them;
2. apply mode: the graphs are recompiled with each tileable site rewritten to
   ``torch.ops.vdit.tile_attention`` with the plan's per-head masks.

With ``plan=`` (a path, a ``Plan``, or a ``TileMask`` for a uniform plan) calibration is
skipped.  ``restore`` puts the original forward back; nothing global is patched besides
raising Dynamo's recompile limits.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .capture.install import install, state_of, uninstall
from .config import OptimizeConfig
from .masks.base import MaskSpec
from .runtime.state import OptimizeState

if TYPE_CHECKING:
    from .plans import Plan


class NoAttentionFoundError(ValueError):
    """The model has no 3D (video self / joint) attention site that could be tiled."""

    def __init__(self, sites: Iterable, model_name: str = "model"):
        sites = list(sites)
        self.sites = sites
        if sites:
            found = "\n  ".join(s.describe() for s in sites)
            msg = (f"{model_name}: expected at least one 3D full attention site (video self-attention or joint "
                   f"video+text attention with a known token layout); found {len(sites)} attention site(s), none tileable:\n  {found}")
        else:
            msg = f"{model_name}: expected at least one 3D full attention site; found no attention at all in the captured graphs"
        super().__init__(msg)


def _split(model_or_pipe) -> tuple[object | None, torch.nn.Module]:
    if isinstance(model_or_pipe, torch.nn.Module):
        return None, model_or_pipe
    module = getattr(model_or_pipe, "transformer", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            "expected a video transformer (nn.Module) or a pipeline with a .transformer module; "
            f"found {type(model_or_pipe).__name__}"
        )
    return model_or_pipe, module


def _call(module: torch.nn.Module, inputs) -> object:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return module(*inputs[0], **inputs[1])
    raise TypeError(f"calibration/example inputs must be forward kwargs (dict) or (args, kwargs); found {type(inputs).__name__}")


def _run_all(module, inputs, desc: str, progress: bool) -> None:
    with torch.no_grad():
        for inp in tqdm(inputs, desc=desc, disable=not progress or len(inputs) < 2):
            _call(module, inp)


def inspect_model(model_or_pipe, example_inputs) -> list:
    """Run the transformer once on ``example_inputs`` (forward kwargs) and list its attention sites.

    Returns :class:`~vdit_compile.passes.detect.AttentionSite` objects in call order, each with
    its kind, layout (or ``None``) and reason.  The model is left as it was.
    """
    _, module = _split(model_or_pipe)
    previous = state_of(module)
    if previous is not None:
        uninstall(module)
    state = OptimizeState(module, OptimizeConfig(progress=False))
    try:
        install(module, state)
        _run_all(module, [example_inputs], "inspect", False)
        return state.site_list()
    finally:
        uninstall(module)
        state.close()
        if previous is not None:
            install(module, previous)


def _load_plan(plan):
    from .plans import Plan

    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"plan must be a path, a Plan or a TileMask; found {type(plan).__name__}")


def _calibration_inputs(pipe, module, calib_prompts, calib_inputs, cfg: OptimizeConfig,
                        outputs: list | None = None) -> list:
    """The transformer calls to calibrate on; ``outputs`` (when given) receives each dense sample (the output
    check's reference): the pipeline's outputs on the prompts, or the module's on ``calib_inputs``."""
    if calib_inputs is not None:
        inputs = list(calib_inputs)
        if not inputs:
            raise ValueError("calib_inputs is empty: expected at least one dict of transformer forward kwargs")
        if outputs is not None:
            from .calibration.output_check import output_tensor

            with torch.no_grad():
                outputs += [output_tensor(_call(module, inp)).cpu() for inp in inputs]
        return inputs
    if calib_prompts is None:
        raise ValueError("optimize needs calib_prompts (with a pipeline), calib_inputs (transformer forward kwargs) "
                         "or plan=...; found none of them")
    if pipe is None:
        raise ValueError("calib_prompts need a pipeline (an object with .transformer); for a bare transformer "
                         "pass calib_inputs=[forward kwargs, ...] instead")
    from .calibration.inputs import capture_transformer_inputs

    return capture_transformer_inputs(pipe, calib_prompts, num_inference_steps=cfg.calib_steps, every=cfg.calib_every,
                                      max_calls=cfg.calib_max_calls, device=None, seed=cfg.calib_seed,
                                      progress=cfg.progress, outputs=outputs, **cfg.calib_kwargs)


def _output_trial(pipe, module, parallel, cfg: OptimizeConfig, calib_prompts, inputs: list, count: int):
    """``trial(plan) -> (samples, sites run sparse)`` for the output check: the model optimised with ``plan``
    (a state of its own, uninstalled afterwards) runs the first ``count`` calibration prompts, or its
    calibration calls for a bare transformer.  Trials compile with the eager backend: the tile op runs its own
    kernels either way, the dense reference ran eagerly too, and an inductor compile per trial would cost minutes
    on a large model."""
    from .calibration.inputs import run_prompts
    from .calibration.output_check import output_tensor

    trial_cfg = OptimizeConfig.build(cfg, backend="eager")

    def trial(plan):
        uninstall(module)
        st = OptimizeState(module, trial_cfg, parallel)
        st.plan, st.mode = plan, "apply"
        install(module, st)
        try:
            if pipe is not None and calib_prompts is not None:
                outs = run_prompts(pipe, list(calib_prompts)[:count], cfg.calib_steps, cfg.calib_seed, cfg.progress,
                                   "output check: prompts under the plan", **cfg.calib_kwargs)
            else:
                with torch.no_grad():
                    outs = [_call(module, inp) for inp in inputs[:count]]
            return [output_tensor(o).cpu() for o in outs], set(st.rewritten)
        finally:
            uninstall(module)
            st.close()

    return trial


def _check_output(pipe, module, plan, parallel, cfg: OptimizeConfig, calib_prompts, inputs, reference):
    """``plan`` after the output check (``cfg.output_psnr``), its trials recorded in the plan's calibration."""
    from .calibration.output_check import check_plan

    trial = _output_trial(pipe, module, parallel, cfg, calib_prompts, inputs, len(reference))
    echo = tqdm.write if cfg.progress else None
    plan, res = check_plan(plan, trial, reference, cfg.output_psnr, cfg.output_check_trials, echo)
    plan.calibration = {**(plan.calibration or {}), "output_check": res.to_dict()}
    return plan


def _check_parallel(parallel):
    if parallel is None:
        return None
    from . import parallel as _par  # noqa: F401 - registers the sequence-parallel pass
    return parallel


def _run_calibration(module, state: OptimizeState, inputs: list, cfg: OptimizeConfig) -> list:
    """Calibration mode: every 3D site of ``module`` feeds its calibrator on ``inputs``; returns the sites met.
    Raises :class:`NoAttentionFoundError` when none is tileable."""
    from .calibration.checkpoint import run_calibration_passes
    from .validation import check_site_filter

    state.mode = "calibrate"
    install(module, state)
    # statistics (+ exact verification of block-mass choices), progress, kill -9 safe checkpoint
    run_calibration_passes(module, inputs, state, _call, cfg, cfg.progress)
    sites = state.site_list()
    if not any(s.tileable for s in sites):
        raise NoAttentionFoundError(sites, type(module).__name__)
    check_site_filter(cfg, sites)
    return sites


def _calibration_settings(cfg: OptimizeConfig, calib_prompts, calib_inputs, inputs: list):
    """The :class:`CalibrationSettings` a plan built from this calibration records (budget, families, data)."""
    from .calibration.run import CalibrationSettings

    from_prompts = calib_prompts is not None and calib_inputs is None
    return CalibrationSettings(cfg.error_budget, cfg.max_density,
                               list(cfg.candidates) if cfg.candidates is not None else None,
                               num_prompts=len(calib_prompts) if from_prompts else None,
                               num_inputs=len(inputs),
                               num_inference_steps=cfg.calib_steps if calib_inputs is None else None,
                               families=list(cfg.families), step_ranges=cfg.step_ranges,
                               tile_tokens=cfg.tile_tokens, selection=cfg.selection)


def optimize(model_or_pipe, calib_prompts=None, calib_inputs=None, plan=None, config: OptimizeConfig | None = None,
             parallel=None, **config_overrides):
    """Rewrite the transformer's 3D attention to tile-sparse attention; returns ``model_or_pipe``.

    Args:
        model_or_pipe: a video transformer module or a pipeline with ``.transformer``.
        calib_prompts: prompts to run the pipeline on for calibration.
        calib_inputs: transformer forward kwargs (list of dicts) for calibration, or to check a
            given plan against the model up front.
        plan: skip calibration: a plan JSON path, a ``Plan``, or a ``TileMask`` applied to every
            tileable site on every head (``TileMask(dense=True)`` routes them through the op densely).
        config: an :class:`OptimizeConfig`; ``config_overrides`` replace its fields.
        parallel: a ``vdit_compile.parallel.Parallel`` config, stored for the parallel pass.
    Raises:
        NoAttentionFoundError: no tileable 3D attention site (the error lists what was found).
        PlanMismatchError: the plan does not fit this model (says what differs).
    """
    cfg = OptimizeConfig.build(config, **config_overrides)
    pipe, module = _split(model_or_pipe)
    from .validation import check_site_filter, validate_optimize

    calib_prompts, calib_inputs = validate_optimize(pipe, module, calib_prompts, calib_inputs, plan, cfg)
    if state_of(module) is not None:
        restore(module)
    state = OptimizeState(module, cfg, _check_parallel(parallel))
    name = type(module).__name__
    try:
        if plan is None:
            reference = [] if cfg.output_psnr is not None else None
            inputs = _calibration_inputs(pipe, module, calib_prompts, calib_inputs, cfg, reference)
            sites = _run_calibration(module, state, inputs, cfg)
            from .calibration.run import build_plan

            settings = _calibration_settings(cfg, calib_prompts, calib_inputs, inputs)
            state.plan = build_plan(module, state.calibrators, settings, sites)
            state.calibrators = {}
            if reference is not None:
                state.plan = _check_output(pipe, module, state.plan, state.parallel, cfg, calib_prompts, inputs,
                                           reference)
        else:
            if isinstance(plan, MaskSpec):
                state.uniform_mask = plan
            else:
                state.plan = _load_plan(plan)
                state.plan.check_compatible(module)
            if calib_inputs is not None:
                sites = inspect_model(module, list(calib_inputs)[0])
                if not any(s.tileable for s in sites):
                    raise NoAttentionFoundError(sites, name)
                check_site_filter(cfg, sites)
                if state.plan is not None:
                    state.plan.check_compatible(module, sites)
                else:
                    from .plans import Plan

                    state.plan = Plan.uniform(sites, plan, model=module)
        from . import wholestep

        example = inputs[0] if plan is None else (next(iter(calib_inputs)) if calib_inputs is not None else None)
        wholestep.attach(module, state, cfg, None if example is None else (lambda fwd: _call(fwd, example)))
        state.mode = "apply"
        install(module, state)
        wholestep.attach_cache(module, state, cfg)
    except BaseException:
        uninstall(module)
        from . import wholestep

        wholestep.detach(state)
        state.close()
        raise
    return model_or_pipe


def check_output(model_or_pipe, plan, output_psnr: float, calib_prompts=None, calib_inputs=None,
                 config: OptimizeConfig | None = None, **config_overrides):
    """The output check (:mod:`vdit_compile.calibration.output_check`) on a plan made elsewhere (a path or a
    ``Plan``, e.g. by ``vdit-compile calibrate``): the dense samples of ``calib_prompts`` (or the transformer's
    outputs on ``calib_inputs``) are computed, the model runs them under the plan, and the plan comes back with
    the heads given back that ``output_psnr`` needs, its trials in ``plan.calibration["output_check"]``.  The
    model is left as it was (not optimised); ``config`` gives the calibration run's settings (steps, seed, pipeline
    kwargs, cost model)."""
    cfg = OptimizeConfig.build(config, output_psnr=output_psnr, **config_overrides)
    pipe, module = _split(model_or_pipe)
    if calib_prompts is None and calib_inputs is None:
        raise ValueError("check_output needs calib_prompts (with a pipeline) or calib_inputs (transformer forward "
                         "kwargs) to run; found neither")
    import copy

    the_plan = copy.deepcopy(_load_plan(plan))  # the caller's Plan is not changed
    the_plan.check_compatible(module)
    previous = uninstall(module)  # the dense reference runs the plain module; an optimised one is put back after
    try:
        reference: list = []
        inputs = _calibration_inputs(pipe, module, calib_prompts, calib_inputs, cfg, reference)
        return _check_output(pipe, module, the_plan, None, cfg, calib_prompts, inputs, reference)
    finally:
        if previous is not None:
            install(module, previous)


def restore(model_or_pipe):
    """Undo :func:`optimize`: the transformer's original forward is back; returns ``model_or_pipe``."""
    _, module = _split(model_or_pipe)
    state = uninstall(module)
    if state is not None:
        from . import wholestep

        wholestep.detach(state)
        state.close()
    return model_or_pipe


def plan_of(model_or_pipe):
    """The :class:`~vdit_compile.plans.Plan` an optimized model runs with (``None`` if not optimized)."""
    _, module = _split(model_or_pipe)
    state = state_of(module)
    return state.plan if state is not None else None


def sites_of(model_or_pipe) -> list:
    """Attention sites an optimized model has met so far (call order)."""
    _, module = _split(model_or_pipe)
    state = state_of(module)
    return state.site_list() if state is not None else []


def calibrate_model(model_or_pipe, inputs: Sequence[dict], settings=None,
                    progress: bool = True) -> Plan:
    """Calibrate ``model_or_pipe``'s transformer on recorded forward kwargs and return the plan.

    Runs :func:`vdit_compile.optimize` in calibration mode (every 3D site feeds a
    :class:`SiteCalibrator`), takes its plan and restores the model, so the caller gets the
    plan and an untouched model.  ``settings`` bookkeeping (prompts, steps) goes into the plan.
    """
    from .calibration.run import CalibrationSettings

    settings = settings or CalibrationSettings()
    extra = {"families": tuple(settings.families)} if settings.families is not None else {}
    config = OptimizeConfig(error_budget=settings.error_budget, max_density=settings.max_density,
                            candidates=settings.candidates, progress=progress, step_ranges=settings.step_ranges,
                            tile_tokens=settings.tile_tokens, calib_checkpoint=settings.checkpoint,
                            selection=settings.selection, **extra)
    try:
        optimize(model_or_pipe, calib_inputs=list(inputs), config=config)
        plan = plan_of(model_or_pipe)
    finally:
        restore(model_or_pipe)
    if plan is None:
        raise RuntimeError("optimize() finished without producing a plan")
    calib = settings.to_dict()
    calib["num_inputs"] = len(inputs)
    calib["candidates"] = (plan.calibration or {}).get("candidates", calib["candidates"])
    plan.calibration = calib
    return plan


def collect_calibration(model_or_pipe, calib_prompts=None, calib_inputs=None, config: OptimizeConfig | None = None,
                        **config_overrides) -> tuple[dict, list]:
    """Run :func:`optimize`'s calibration and return ``(calibrators, sites)`` instead of a plan; the model is left
    untouched.

    Why: one calibration's statistics serve plans at any error budget, step-range count or per-head pick
    (``calibration.run.build_plan(module, calibrators, settings, sites)``), so a sweep over budgets (e.g.
    ``benchmarks/calibration_families.py``) calibrates once instead of once per plan."""
    cfg = OptimizeConfig.build(config, **config_overrides)
    pipe, module = _split(model_or_pipe)
    from .validation import validate_optimize

    calib_prompts, calib_inputs = validate_optimize(pipe, module, calib_prompts, calib_inputs, None, cfg)
    if state_of(module) is not None:
        restore(module)
    state = OptimizeState(module, cfg, None)
    try:
        inputs = _calibration_inputs(pipe, module, calib_prompts, calib_inputs, cfg)
        sites = _run_calibration(module, state, inputs, cfg)
        return dict(state.calibrators), sites
    finally:
        uninstall(module)
        state.close()
