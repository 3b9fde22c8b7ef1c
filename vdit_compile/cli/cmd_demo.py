"""``vdit-compile demo``: calibrate the embedded model, show the masks, the speed and the quality price.

Rows: dense, tile-sparse (the calibrated plan) and tile-sparse + step cache (``--cache``, default taylorseer:
the best training-free setting).  Writes into ``--out`` (default ./vdit-demo): plan.json, heatmaps/*.png,
dense_vs_optimised.gif (dense left, the cached tile-sparse row right), summary.json.  ``--fast`` adds the distilled few-step model when its weights
are shipped (says so when they are not).  Defaults fit an idle 2-core CPU in a few minutes (calibration on 10 steps: about 80 s).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="calibrate + rewrite the embedded model; latency, quality, GIF, heatmaps",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("vdit-demo"), help="output directory (default ./vdit-demo)")
    p.add_argument("--prompts", type=int, default=2, help="held-out prompts to sample and score (default 2)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of the dense and optimised runs (default 10)")
    p.add_argument("--calib-prompts", type=int, default=1, help="calibration prompts (default 1)")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="denoising steps per calibration prompt (default: --steps, so calibration sees the timesteps "
                        "the sampler will run)")
    p.add_argument("--error-budget", type=float, default=None, help="per-head attention error budget (default: the core's)")
    p.add_argument("--families", default=None,
                   help="comma-separated mask families to search (default: tile,win3d,spatial; 'tile' = frame tiles only)")
    p.add_argument("--step-ranges", type=int, default=1,
                   help="at most this many ranges of denoising steps with their own masks (default 1: one plan for every step)")
    p.add_argument("--fast", action="store_true", help="also sample with the distilled few-step weights")
    p.add_argument("--fast-steps", type=int, default=None, help="steps of the few-step model (default: its own)")
    p.add_argument("--tiny", action="store_true", help="random tiny model instead of the shipped one (tests)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-gif", action="store_true", help="do not write GIFs")
    p.add_argument("--world", default="embedded", choices=("embedded", "textured"),
                   help="reference model: embedded (default; 1,024 tokens) or textured (4,096 tokens, local attention)")
    p.add_argument("--cache", default="taylorseer", choices=("taylorseer", "fbc", "none"),
                   help="step caching sampled on top of the sparse plan as a third row (default taylorseer; "
                        "none: attention only)")
    p.add_argument("--cache-interval", type=int, default=None,
                   help="taylorseer: evaluate one step in this many after the warm-up (default 2)")
    p.add_argument("--cost-model", default="auto", choices=("auto", "measure", "always"),
                   help="auto (default): on CPU a tiled site is rewritten only where the op is timed faster than dense "
                        "SDPA; always: rewrite every tiled site (to see the plan's quality whatever the speed)")
    p.add_argument("--tile-tokens", type=int, default=None, metavar="N",
                   help="tokens per token tile of the window families (default: the core's rule)")
    p.add_argument("--output-psnr", type=float, default=None, metavar="DB",
                   help="after calibration, give heads back to dense attention until the calibration prompt's sample "
                        "reaches this PSNR against dense (default: 34; 0: no check, per-head budgets only)")
    p.set_defaults(func=run)
    return p


def _output_psnr(value: float | None) -> float | None:
    """The demo's default target when not given; 0 turns the check off; negative, inf and NaN are refused."""
    from ..eval.demo import DEMO_OUTPUT_PSNR
    from ..validation import check_number

    if value is None:
        return DEMO_OUTPUT_PSNR
    return check_number("--output-psnr (dB; 0: off)", value, minimum=0) or None


def run(args) -> int:
    import torch

    from ..eval.demo import DemoOptions, run_demo

    if args.cache_interval is not None and args.cache != "taylorseer":
        print(f"vdit-compile demo: error: --cache-interval is taylorseer's interval; found --cache {args.cache}",
              file=sys.stderr)
        return 2
    try:
        output_psnr = _output_psnr(args.output_psnr)
    except ValueError as exc:
        print(f"vdit-compile demo: error: {exc}", file=sys.stderr)
        return 2
    opts = DemoOptions(out=args.out, prompts=args.prompts, steps=args.steps, calib_prompts=args.calib_prompts,
                       calib_steps=args.calib_steps, error_budget=args.error_budget, fast=args.fast,
                       families=tuple(f.strip() for f in args.families.split(",") if f.strip()) if args.families else None,
                       step_ranges=args.step_ranges,
                       fast_steps=args.fast_steps, tiny=args.tiny, gif=not args.no_gif, world=args.world,
                       cache=None if args.cache == "none" else args.cache, cache_interval=args.cache_interval,
                       cost_model=args.cost_model, output_psnr=output_psnr, tile_tokens=args.tile_tokens,
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        run_demo(opts)
    except FileNotFoundError as exc:
        print(f"vdit-compile demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
