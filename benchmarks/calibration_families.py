"""Density vs quality of calibrated plans on the embedded model, the demo's way: tile-only vs all families vs
all families + step ranges, at several error budgets.

    python benchmarks/calibration_families.py [--budgets 0.05,0.1] [--modes tile,all,all+steps3] [--json out.jsonl]
        [--curve docs/calibration_curve.png] [--markdown table.md]

Like ``vdit-compile demo``: calibrate on the demo's calibration prompt(s) (``--calib-prompts``; ``--calib-steps``,
default the sampling steps, as the demo), sample its scored prompts (``--prompts``, 10 steps, fixed seeds) densely
once and with each plan (every tiled site rewritten: no cost model), and report

* ``mean_density``: mean over *all* 3D sites and heads of the kept fraction of L x L (dense sites count 1.0);
  a step-aware plan's is weighted by the share of the sampling calls falling in each step range;
* ``psnr_db``: mean PSNR of the optimised clips vs the dense clips (``vdit_compile.eval.metrics.psnr``).

``--curve`` draws PSNR vs density for every mode over the budgets (matplotlib PNG); ``--markdown`` writes the
table with the command, the machine and the date beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

ALL = ("tile", "win3d", "spatial")
#: mode -> (families, selection rule): ``capped`` = all families under the ``tile-capped`` selection
#: (``vdit_compile.calibration.allocation``: no site errs more than frame tiles alone would at the budget)
#: ``sens`` = all families, the ``head`` rule with each site's budget scaled by its measured sensitivity
#: (:func:`site_sensitivities`, :func:`sensitivity_picks`; an experiment of this benchmark, not a library rule)
MODES = {"tile": (("tile",), "head"), "all": (ALL, "head"), "capped": (ALL, "tile-capped"), "sens": (ALL, "sens")}


def parse_mode(name: str) -> tuple[tuple[str, ...], int, str]:
    """``tile`` | ``all`` | ``capped`` | ``<mode>+steps<K>``: the families, the step-range count and the selection
    rule of a mode."""
    base, _, steps = name.partition("+steps")
    if base not in MODES:
        raise ValueError(f"unknown mode {name!r}: expected tile, all, capped, sens, or <tile|all|capped>+steps<K>")
    if base == "sens" and steps:
        raise ValueError("mode sens has no step ranges")
    return MODES[base][0], int(steps) if steps else 1, MODES[base][1]


def plan_density(plan, call_timesteps: list) -> float:
    """Mean head density over all 3D sites (dense ones 1.0), step ranges weighted by the sampling calls."""
    return plan.mean_density(call_timesteps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.05,0.1")
    ap.add_argument("--modes", default="tile,all,capped,all+steps3,capped+steps3")
    ap.add_argument("--prompts", type=int, default=8,
                    help="scored prompts (default 8; the demo scores 2, whose mean PSNR moves by 2-4 dB between prompts)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (the demo's: 10)")
    ap.add_argument("--calib-prompts", type=int, default=1, help="calibration prompts (the demo's: 1)")
    ap.add_argument("--calib-steps", type=int, default=None,
                    help="calibration steps per prompt (default: --steps, as the demo)")
    ap.add_argument("--tile-tokens", type=int, default=None, help="token tile of window families (default rule)")
    ap.add_argument("--json", default=None, help="append one JSON line per (mode, budget)")
    ap.add_argument("--curve", default=None, help="write the PSNR-vs-density picture here (PNG)")
    ap.add_argument("--markdown", default=None, help="write the table (with command, machine, date) here")
    ap.add_argument("--sens-eps", type=float, default=0.1,
                    help="mode sens: relative size of the noise added to one site's output to measure its sensitivity")
    ap.add_argument("--skip", default="",
                    help="comma-separated MODE@BUDGET pairs not to run (measured by an earlier, interrupted run)")
    ap.add_argument("--replot", default=None,
                    help="run nothing: draw --curve and write --markdown from the rows of this JSON lines file "
                         "(runs split over several processes)")
    args = ap.parse_args()
    args.calib_steps = args.calib_steps or args.steps
    if args.replot:
        with open(args.replot) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if args.curve:
            draw_curve(rows, args.curve)
        if args.markdown:
            write_markdown(rows, args.markdown, args.calib_prompts, args.calib_steps, args.prompts, args.steps)
        return

    import vdit_compile
    from vdit_compile.calibration import CalibrationSettings, capture_transformer_inputs
    from vdit_compile.calibration.run import build_plan
    from vdit_compile.eval.demo import CALIB_OFFSET, record_timesteps
    from vdit_compile.eval.metrics import psnr
    from vdit_compile.eval.prompts import prompt_set
    from vdit_compile.eval.sampling import sample
    from vdit_compile.models.embedded import load_pipeline
    from vdit_compile.plans.plan import TILEABLE_KINDS

    torch.manual_seed(0)
    pipe = load_pipeline(device="cpu")
    ps = prompt_set(args.prompts)
    seen: list = []
    hook = record_timesteps(pipe, seen)
    dense = sample(pipe, ps.prompts, ps.seeds, args.steps, None, 1, False).clips
    hook.remove()
    calib = prompt_set(args.calib_prompts, CALIB_OFFSET).prompts
    inputs = capture_transformer_inputs(pipe, calib, num_inference_steps=args.calib_steps, device=None, progress=False)
    rows = []
    modes = [(m, *parse_mode(m)) for m in args.modes.split(",")]
    stats: dict = {}  # families -> (calibrators, sites, seconds): statistics do not depend on budget or ranges
    for mode, families, ranges, selection in modes:
        if families not in stats:
            stats[families] = collect(pipe, inputs, families, args.tile_tokens)
        cals, sites, secs = stats[families]
        for b in (float(x) for x in args.budgets.split(",")):
            if f"{mode}@{b:g}" in args.skip.split(","):
                continue
            settings = CalibrationSettings(error_budget=b, num_prompts=len(calib), num_inference_steps=args.calib_steps,
                                           families=list(families), step_ranges=ranges, tile_tokens=args.tile_tokens,
                                           selection="head" if selection == "sens" else selection)
            if selection == "sens":
                if "weights" not in stats:
                    cp = prompt_set(args.calib_prompts, CALIB_OFFSET)
                    stats["weights"] = site_sensitivities(pipe, list(cals), cp.prompts, cp.seeds, args.calib_steps,
                                                          args.sens_eps)
                    print(json.dumps({"site_sensitivity": stats["weights"]}), flush=True)
                plan = build_plan(pipe.transformer, cals, settings, sites,
                                  picks=sensitivity_picks(cals, stats["weights"], b, settings.max_density))
            else:
                plan = build_plan(pipe.transformer, cals, settings, sites)
            vdit_compile.optimize(pipe, plan=plan, progress=False, cost_model="always")
            try:
                clips = sample(pipe, ps.prompts, ps.seeds, args.steps, None, 1, False).clips
            finally:
                vdit_compile.restore(pipe)
            vals = [v for v in psnr(clips, dense) if math.isfinite(v)]
            fams: dict[str, int] = {}
            for s in plan.sites:
                for r in (s.step_ranges or []) or ([None] if s.tiled else []):
                    for m in (r.masks if r is not None else s.masks):
                        fams[m.family if not m.dense else "dense"] = fams.get(m.family if not m.dense else "dense", 0) + 1
            row = {"mode": mode, "budget": b, "mean_density": round(plan_density(plan, seen), 4),
                   "psnr_db": round(sum(vals) / len(vals), 2) if vals else float("inf"),
                   "psnr_se_db": round(statistics.stdev(vals) / math.sqrt(len(vals)), 2) if len(vals) > 1 else None,
                   "psnr_per_prompt": [round(v, 2) for v in psnr(clips, dense)],
                   "tiled_sites": len(plan.tiled_sites()),
                   "sites": sum(s.kind in TILEABLE_KINDS and s.layout is not None for s in plan.sites),
                   "step_ranges": [len(s.step_ranges) for s in plan.sites if s.step_ranges][:1] or [1],
                   "head_masks_by_family": fams, "calibration_seconds": round(secs, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(f"embedded model on CPU; calibration {len(calib)} prompt(s) x {args.calib_steps} steps; "
          f"{len(ps)} scored prompts x {args.steps} steps")
    if args.curve:
        draw_curve(rows, args.curve)
    if args.markdown:
        write_markdown(rows, args.markdown, len(calib), args.calib_steps, len(ps), args.steps)


def site_sensitivities(pipe, names, prompts, seeds, steps: int, eps: float) -> dict[str, float]:
    """Per site: the mean squared difference of the sampled clips when Gaussian noise of relative L2 size ``eps`` is
    added to that site's output at every call, over ``eps ** 2`` (so a site's squared relative output error times
    its weight estimates the squared error it adds to the video, to first order).  One sampling run per site."""
    from vdit_compile.eval.sampling import sample

    ref = sample(pipe, prompts, seeds, steps, None, 1, False).clips
    out = {}
    for name in names:
        gen = torch.Generator().manual_seed(1234)

        def noisy(module, inputs, output, gen=gen):
            n = torch.randn(output.shape, generator=gen, dtype=output.dtype)
            return output + n * (eps * output.norm() / n.norm())

        handle = pipe.transformer.get_submodule(name).register_forward_hook(noisy)
        try:
            clips = sample(pipe, prompts, seeds, steps, None, 1, False).clips
        finally:
            handle.remove()
        out[name] = float(((clips - ref) ** 2).mean()) / eps ** 2
    return out


def sensitivity_picks(cals: dict, weights: dict, budget: float, max_density, cap: float = 2.0) -> dict[str, list[int]]:
    """Per site a budget scaled by its sensitivity, ``budget x min(cap, sqrt(w_median / w_site))``, then the ``head``
    rule inside it: a site whose error shows up in the video ``k`` times more than the median site's gets a budget
    ``sqrt(k)`` times tighter, so every site adds about the same squared error to the video.  (Matching the ``head``
    rule's density while keeping its per-head budget leaves no freedom: that rule is already the sparsest choice
    within the budget, head by head.)"""
    ref = statistics.median(weights.values())
    picks = {}
    for name, cal in cals.items():
        b = budget * min(cap, math.sqrt(ref / max(weights[name], 1e-30)))
        err, norm = cal.error_sums(None)
        picks[name], _ = cal.choose((err / norm.clamp(min=1e-300)[:, None]).sqrt(), cal.candidate_densities(), b,
                                    max_density)
    return picks


def write_markdown(rows: list[dict], path: str, calib_prompts: int, calib_steps: int, prompts: int, steps: int) -> None:
    """The rows as a markdown table, under the command that made them, the machine and the date."""
    import datetime
    import os
    import platform
    import shlex
    import sys

    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    head = (f"`{cmd}`: {datetime.date.today().isoformat()}, {platform.machine()} CPU ({os.cpu_count()} cores), "
            f"torch {torch.__version__}; calibration {calib_prompts} prompt(s) x {calib_steps} steps, "
            f"{prompts} scored prompts x {steps} steps.\n\n")
    lines = ["| budget | mode | mean density (all 3D sites) | PSNR vs dense (dB) | tiled sites | step ranges "
             "| heads by family (all ranges) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["mode"])):
        fams = ", ".join(f"{k} {v}" for k, v in sorted(r["head_masks_by_family"].items()))
        se = f" +- {r['psnr_se_db']:.2f}" if r.get("psnr_se_db") is not None else ""
        lines.append(f"| {r['budget']:g} | {r['mode']} | {r['mean_density']:.3f} | {r['psnr_db']:.2f}{se} | "
                     f"{r['tiled_sites']} of {r['sites']} | {r['step_ranges'][0]} | {fams} |")
    with open(path, "w") as fh:
        fh.write(head + "\n".join(lines) + "\n")


def collect(pipe, inputs, families, tile_tokens):
    """Run calibration once for a family set and keep its calibrators and sites (plans at any budget and
    step-range count are then built from them, as ``optimize`` would)."""
    from vdit_compile.api import collect_calibration

    t0 = time.perf_counter()
    cals, sites = collect_calibration(pipe, calib_inputs=inputs, progress=False, families=tuple(families),
                                      tile_tokens=tile_tokens)
    return cals, sites, time.perf_counter() - t0


def draw_curve(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["mean_density"], min(r["psnr_db"], 60.0), r["budget"]) for r in rows if r["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
        for d, p, b in pts:
            ax.annotate(f"{b:g}", (d, p), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("mean density over all 3D sites (1 = dense)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title("embedded model, CPU: calibrated plans (labels: error budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
