"""The demo (``vdit-compile demo``): calibrate the embedded model, show what changed, price it.

Steps, each reported as it runs (nothing is faked: a step whose building block is missing is
reported as missing, with the import error, and skipped):

1. load the embedded pipeline (shipped weights; ``tiny=True``: a random 2-layer model, for tests);
2. sample the held-out prompts densely (timed);
3. ``vdit_compile.optimize(pipe, calib_prompts=...)``: calibrate tile masks on *other* prompts, rewrite;
4. print the attention sites and the chosen masks with densities (the plan table), save plan.json
   and the attention heatmaps;
5. sample the same prompts and seeds with the optimised pipeline (timed);
6. ``cache`` (default ``"taylorseer"``): the same plan plus training-free step caching
   (``OptimizeConfig.cache``), sampled and timed as a third row: the best setting that needs no training;
7. scorecard of all rows (classifier accuracy, temporal consistency, flicker; PSNR/SSIM of each vs
   dense on the same seeds) and a side-by-side GIF (dense left, best optimised row right);
8. ``fast=True``: the same for the distilled few-step weights, when shipped.

Defaults are sized for a 2-core CPU: a few minutes; calibration on 10 steps takes about 80 s of it (docs/calibration.md).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .classifier import load_classifier
from .prompts import prompt_set
from .sampling import Samples, sample
from .scorecard import card_header, render_table, score_clips, to_json

#: Offset of the calibration prompts among the held-out prompts (disjoint from the scored ones).
CALIB_OFFSET = 500

#: The demo's output check (``OptimizeConfig.output_psnr``, dB on the calibration prompt against dense): the
#: scored prompts are other prompts, so the check asks for a margin above the 30 dB the demo is judged by; on the
#: textured world the scored prompts came out 3.3-3.9 dB under the calibration prompt (docs/calibration.md).
DEMO_OUTPUT_PSNR = 34.0


@dataclass
class DemoOptions:
    out: Path = Path("vdit-demo")
    prompts: int = 2
    steps: int = 10
    calib_prompts: int = 1
    calib_steps: Optional[int] = None  # None: ``steps`` (calibrate on the timesteps the sampler runs)
    error_budget: Optional[float] = None
    families: Optional[tuple] = None  # mask families to search (None: OptimizeConfig's default)
    step_ranges: int = 1
    fast: bool = False
    fast_steps: Optional[int] = None
    tiny: bool = False
    device: str = "cpu"
    gif: bool = True
    progress: bool = True
    world: str = "embedded"  # which reference model: vdit_compile.models.worlds.WORLDS
    cache: Optional[str] = "taylorseer"  # step caching on top of the sparse plan (None: attention only)
    cache_interval: Optional[int] = None  # taylorseer's interval (None: the policy's default, 2)
    cost_model: str = "auto"  # OptimizeConfig.cost_model ("always": rewrite every tiled site, to see a plan's quality)
    tile_tokens: Optional[int] = None  # OptimizeConfig.tile_tokens (token tile of the window families)
    output_psnr: Optional[float] = DEMO_OUTPUT_PSNR  # OptimizeConfig.output_psnr on the calibration prompt (None: off)


@dataclass
class DemoReport:
    """What the demo did; ``missing`` lists every step that could not run and why."""

    steps_done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    cards: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    plan_table: str = ""
    latency: dict = field(default_factory=dict)
    cost_model: list[str] = field(default_factory=list)
    plan_density: Optional[float] = None  # Plan.mean_density over the sampler's calls (all 3D sites)
    output_check: Optional[dict] = None  # the plan's output check (calibration.output_check), when it ran
    seconds: float = 0.0


def _say(msg: str, echo: Callable[[str], None]) -> None:
    echo(msg)


def fast_run_dir() -> Optional[Path]:
    """Directory of the shipped few-step (distilled) embedded model, or None.

    Looked up as ``vdit_compile.distill.SHIPPED_RUN`` (a path) or ``vdit_compile.distill.shipped_run()``
    when the distill package defines them, else ``vdit_compile/distill/shipped/``.
    """
    from .. import distill

    candidates = []
    if callable(getattr(distill, "shipped_run", None)):
        try:
            candidates.append(distill.shipped_run())
        except FileNotFoundError:
            pass
    if getattr(distill, "SHIPPED_RUN", None):
        candidates.append(distill.SHIPPED_RUN)
    candidates.append(Path(distill.__file__).resolve().parent / "shipped")
    for c in candidates:
        if c is not None and (Path(c) / "schedule.json").is_file() and (Path(c) / "config.json").is_file():
            return Path(c)
    return None


def _load(opts: DemoOptions, report: DemoReport, echo):
    if opts.world != "embedded":
        return _load_world(opts, echo)
    from ..models.embedded import load_pipeline, weights_available

    if opts.tiny:
        _say("model: embedded, tiny random weights (test mode: quality figures are meaningless)", echo)
        return load_pipeline(device=opts.device, weights=None, tiny=True)
    if not weights_available():
        raise FileNotFoundError(
            "the embedded model's trained weights are not shipped in this installation "
            "(vdit_compile/models/embedded/weights/); run tools/train_reference.py --ship, or use --tiny"
        )
    _say("model: embedded (shipped weights)", echo)
    return load_pipeline(device=opts.device)


def _load_world(opts: DemoOptions, echo):
    """Another world's reference model (``--world``); its loader says how to train it when not shipped."""
    from ..models.worlds import world_package

    w = world_package(opts.world)
    if opts.tiny:
        _say(f"model: {opts.world}, tiny random weights (test mode: quality figures are meaningless)", echo)
        return w.load_pipeline(device=opts.device, weights=None, tiny=True)
    pipe = w.load_pipeline(device=opts.device)
    _say(f"model: {opts.world} (shipped weights)", echo)
    return pipe


def record_timesteps(pipe, calls: list):
    """A forward pre-hook on ``pipe.transformer`` appending each call's timestep to ``calls`` (None: no module)."""
    from ..runtime.timestep import call_timestep

    module = getattr(pipe, "transformer", None)
    if not isinstance(module, torch.nn.Module):
        return None
    return module.register_forward_pre_hook(lambda m, a, kw: calls.append(call_timestep(m, a, kw)), with_kwargs=True)


def _timing(s: Samples) -> dict:
    return {"seconds_per_video": s.seconds_per_video, "first_call_seconds": s.first_batch_seconds}


def _optimize(pipe, opts: DemoOptions, report: DemoReport, echo) -> bool:
    from .. import optimize, plan_of
    from ..plans.show import format_table, write_heatmaps

    calib = prompt_set(opts.calib_prompts, CALIB_OFFSET, world=opts.world).prompts
    steps = opts.calib_steps or opts.steps
    _say(f"calibrating tile masks on {len(calib)} other prompt(s), {steps} step(s) each ...", echo)
    kw = {"calib_steps": steps, "progress": opts.progress, "step_ranges": opts.step_ranges, "cost_model": opts.cost_model}
    if opts.error_budget is not None:
        kw["error_budget"] = opts.error_budget
    if opts.output_psnr is not None:
        kw["output_psnr"] = opts.output_psnr
    if opts.families is not None:
        kw["families"] = tuple(opts.families)
    if opts.tile_tokens is not None:
        kw["tile_tokens"] = opts.tile_tokens
    t0 = time.perf_counter()
    optimize(pipe, calib_prompts=calib, **kw)
    report.latency["calibration_seconds"] = time.perf_counter() - t0
    plan = plan_of(pipe)
    report.output_check = (plan.calibration or {}).get("output_check")  # the plan table below prints it
    plan_path = opts.out / "plan.json"
    plan.save(plan_path)
    report.files.append(str(plan_path))
    report.plan_table = format_table(plan)
    report.files += [str(p) for p in write_heatmaps(plan, opts.out / "heatmaps")]
    _say("attention sites and chosen masks:\n" + report.plan_table, echo)
    report.steps_done.append("calibrate + rewrite")
    return True


#: Profiler events counted as attention: dense SDPA (any site, cross-attention included) and the tile op.
ATTENTION_EVENTS = ("aten::scaled_dot_product_attention", "vdit::tile_attention")


def attention_profile(pipe, prompt: str, seed: int, steps: int = 2) -> dict:
    """Attention time and its share of one short sampling run (``steps`` steps, one prompt), profiled.

    A separate run after the timed ones (the profiler's own overhead stays out of the latency figures):
    ``torch.profiler`` records every operator; the attention time is the summed duration of the
    top-level attention events (:data:`ATTENTION_EVENTS`: what each attention site calls, dense or
    tile-sparse), the step time the run's wall time.  On CUDA the durations are the kernels' device time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.device(getattr(pipe, "device", "cpu")).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        s = sample(pipe, [prompt], [seed], steps, None, 1, False, desc="profiled run")
    events = [e for e in prof.key_averages() if e.key in ATTENTION_EVENTS]
    us = sum((e.device_time_total if cuda else e.cpu_time_total) for e in events)
    total = s.seconds_per_video
    attn = us / 1e6
    return {"attention_seconds": attn, "run_seconds": total, "attention_share": attn / total if total else 0.0,
            "steps": steps, "calls": int(sum(e.count for e in events))}


def _cost_model_lines(pipe) -> list[str]:
    """Sites the cost model left dense (with its timing) and sites it let through, from the model's state."""
    from ..capture.install import state_of

    st = state_of(getattr(pipe, "transformer", pipe))
    if st is None:
        return []
    lines = []
    for name, (ok, why) in st.cost_decisions.items():
        lines.append(f"{name}: {'tile op' if ok else 'DENSE'} ({why})")
    return lines


def plan_of_pipe(pipe):
    from .. import plan_of

    return plan_of(pipe)


def _gif(dense: torch.Tensor, other: torch.Tensor, path: Path) -> str:
    """Side by side: dense clip i in column 0, the other sampler's clip i in column 1."""
    from ..models.embedded import save_gif

    pairs = torch.stack([dense, other], dim=1).flatten(0, 1)  # (2N, T, 3, H, W): d0, o0, d1, o1, ...
    return save_gif(pairs, path, columns=2, scale=6)


def _fast(opts: DemoOptions, ps, dense: Samples, clf, report: DemoReport, echo) -> None:
    run_dir = fast_run_dir()
    if run_dir is None:
        msg = ("--fast: the distilled few-step weights are not shipped in this installation (expected a run exported "
               "by tools/distill.py into vdit_compile/distill/shipped/); skipped")
        report.missing.append(msg)
        _say("MISSING: " + msg, echo)
        return
    from ..distill import load_run

    fast = load_run(run_dir, device=opts.device)
    steps = opts.fast_steps or getattr(fast, "default_steps", 4)
    s = sample(fast, ps.prompts, ps.seeds, steps, None, 1, opts.progress, desc=f"few-step ({steps} steps)")
    card = card_header(fast, f"distilled {steps}-step", steps, None, len(ps), 1, {"run": str(run_dir)})
    card.update(score_clips(s.clips, ps, dense.clips, clf, real=False))
    card.update(_timing(s))
    report.cards.append(card)
    report.latency[f"distilled_{steps}_step_seconds_per_video"] = s.seconds_per_video
    if opts.gif:
        report.files.append(_gif(dense.clips, s.clips, opts.out / "dense_vs_fast.gif"))
    report.steps_done.append("distilled few-step sampling")


def _cached(pipe, opts: DemoOptions, ps, dense: Samples, clf, report: DemoReport, echo) -> Optional[Samples]:
    """The plan just calibrated plus training-free step caching (``OptimizeConfig.cache``): sampled, scored, timed.

    Re-optimises with the calibrated plan (no second calibration; the cost model's timings are reused),
    so the tile-sparse row and this one differ only by the cache.
    """
    from .. import optimize
    from ..wholestep import report_of

    kw = {"cache": opts.cache, "progress": False, "cost_model": opts.cost_model}
    if opts.cache_interval is not None:
        kw["cache_threshold"] = opts.cache_interval
    optimize(pipe, plan=plan_of_pipe(pipe), **kw)
    s = sample(pipe, ps.prompts, ps.seeds, opts.steps, None, 1, opts.progress, desc=f"optimised + {opts.cache} cache")
    stats = (report_of(pipe) or {}).get("cache") or {}
    card = card_header(pipe, f"tile-sparse + {opts.cache} cache", opts.steps, None, len(ps), 1,
                       {"plan": str(opts.out / "plan.json"), "cache": opts.cache})
    card.update(score_clips(s.clips, ps, dense.clips, clf, real=False))
    card.update(_timing(s))
    report.cards.append(card)
    lat = report.latency
    lat["cached_seconds_per_video"] = s.seconds_per_video
    lat["cached_speedup"] = dense.seconds_per_video / s.seconds_per_video
    lat["cached_calls"], lat["cached_evaluations"] = stats.get("calls"), stats.get("evaluations")
    report.steps_done.append("optimised + step cache sampling")
    return s


def _attention_lines(lat: dict) -> list[str]:
    """Attention time dense vs optimised and its share of the run (profiled runs, see attention_profile)."""
    d, o = lat.get("dense_attention"), lat.get("optimised_attention")
    if not d:
        return []
    n = d["steps"]
    line = (f"attention ({n}-step profiled run, 1 video): dense {d['attention_seconds']:.2f} s "
            f"= {100 * d['attention_share']:.0f}% of {d['run_seconds']:.2f} s")
    if o:
        ratio = d["attention_seconds"] / o["attention_seconds"] if o["attention_seconds"] else float("inf")
        line += (f"; optimised {o['attention_seconds']:.2f} s = {100 * o['attention_share']:.0f}% of "
                 f"{o['run_seconds']:.2f} s (attention x{ratio:.2f})")
    return [line]


def run_demo(opts: DemoOptions, echo: Callable[[str], None] = print) -> DemoReport:
    """Run the demo (see module doc); writes into ``opts.out`` and returns the report."""
    t_start = time.perf_counter()
    opts.out = Path(opts.out)
    opts.out.mkdir(parents=True, exist_ok=True)
    report = DemoReport()
    pipe = _load(opts, report, echo)
    clf = load_classifier(world=opts.world)
    ps = prompt_set(opts.prompts, world=opts.world)
    _say(f"prompts ({opts.steps} sampling steps each):\n" + "\n".join(f"  [{s}] {p}" for p, s in zip(ps.prompts, ps.seeds)), echo)

    calls: list = []  # the sampler's timesteps: a step-aware plan's density is weighted by its calls per range
    hook = record_timesteps(pipe, calls)
    try:
        dense = sample(pipe, ps.prompts, ps.seeds, opts.steps, None, 1, opts.progress, desc="dense sampling")
    finally:
        if hook is not None:
            hook.remove()
    dense_card = card_header(pipe, "dense (reference)", opts.steps, None, len(ps), 1)
    dense_card.update(score_clips(dense.clips, ps, None, clf))
    dense_card.update(_timing(dense))
    report.cards.append(dense_card)
    report.latency["dense_seconds_per_video"] = dense.seconds_per_video
    report.latency["dense_attention"] = attention_profile(pipe, ps.prompts[0], ps.seeds[0])
    report.steps_done.append("dense sampling")

    if _optimize(pipe, opts, report, echo):
        opt = sample(pipe, ps.prompts, ps.seeds, opts.steps, None, 1, opts.progress, desc="optimised sampling")
        card = card_header(pipe, "tile-sparse", opts.steps, None, len(ps), 1, {"plan": str(opts.out / "plan.json")})
        card.update(score_clips(opt.clips, ps, dense.clips, clf, real=False))
        card.update(_timing(opt))
        report.cards.append(card)
        report.latency["optimised_seconds_per_video"] = opt.seconds_per_video
        report.latency["optimised_first_call_seconds"] = opt.first_batch_seconds
        report.latency["speedup"] = dense.seconds_per_video / opt.seconds_per_video
        plan = plan_of_pipe(pipe)
        report.latency["tiled_sites"] = len(plan.tiled_sites())
        report.plan_density = plan.mean_density(calls)
        _say(f"plan: mean density over all 3D sites (a dense site counts 1.0"
             f"{', step ranges weighted by the sampling calls' if plan.step_aware else ''}): "
             f"{report.plan_density:.3f}", echo)
        report.latency["optimised_attention"] = attention_profile(pipe, ps.prompts[0], ps.seeds[0])
        report.cost_model = _cost_model_lines(pipe)
        from ..capture.install import state_of

        report.latency["rewritten_sites"] = len(state_of(pipe.transformer).rewritten)
        report.steps_done.append("optimised sampling")
        best = opt
        if opts.cache is not None:
            best = _cached(pipe, opts, ps, dense, clf, report, echo) or opt
        if opts.gif:
            report.files.append(_gif(dense.clips, best.clips, opts.out / "dense_vs_optimised.gif"))
        from .. import restore

        restore(pipe)
    if opts.fast:
        _fast(opts, ps, dense, clf, report, echo)

    lat = report.latency
    lines = [f"dense: {lat['dense_seconds_per_video']:.2f} s/video"]
    if "optimised_seconds_per_video" in lat:
        lines.append(f"tile-sparse: {lat['optimised_seconds_per_video']:.2f} s/video (first call incl. compile "
                     f"{lat['optimised_first_call_seconds']:.2f} s), speed-up x{lat['speedup']:.2f}; "
                     f"calibration {lat['calibration_seconds']:.1f} s")
        if not lat["tiled_sites"]:
            lines.append("no site was tiled (every head needed dense attention within the error budget): the optimised "
                         "pipeline computes dense attention, so any latency difference is measurement noise")
        elif not lat["rewritten_sites"]:
            lines.append("every tiled site was left dense by the cost model (the tile op is not faster than dense SDPA "
                         "here): the optimised pipeline computes dense attention, so any latency difference is noise")
    if "cached_seconds_per_video" in lat:
        lines.append(f"tile-sparse + step cache ({opts.cache}): {lat['cached_seconds_per_video']:.2f} s/video, "
                     f"{lat['cached_evaluations']} of {lat['cached_calls']} transformer calls evaluated, "
                     f"speed-up x{lat['cached_speedup']:.2f}"
                     + ("  <- the best training-free setting" if lat["cached_evaluations"] != lat["cached_calls"]
                        else " (the cache skipped no call at these steps: any difference is noise)"))
    lines += _attention_lines(lat)
    _say("latency (" + dense_card["device"] + "):\n  " + "\n  ".join(lines), echo)
    if report.cost_model:
        _say("cost model (tile op vs dense SDPA, timed on this device per shape class):\n  "
             + "\n  ".join(report.cost_model), echo)
    _say("scorecard (PSNR/SSIM against the dense clips on the same prompts and seeds):\n" + render_table(report.cards), echo)
    report.seconds = time.perf_counter() - t_start
    summary = {**{k: v for k, v in asdict(report).items() if k != "cards"}, "cards": report.cards, "options": {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}}
    to_json(summary, opts.out / "summary.json")
    report.files.append(str(opts.out / "summary.json"))
    _say("wrote:\n  " + "\n  ".join(report.files), echo)
    if report.missing:
        _say("not shown (missing):\n  " + "\n  ".join(report.missing), echo)
    _say(f"demo finished in {report.seconds:.1f} s", echo)
    return report
