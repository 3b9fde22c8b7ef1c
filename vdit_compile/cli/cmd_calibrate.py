"""``vdit-compile calibrate MODEL --prompts FILE -o plan.json``: measure attention, choose masks, save the plan.

A pipeline is run on the prompts for a few denoising steps while the transformer's inputs are
recorded; a bare transformer module is calibrated on ``--inputs`` (or its factory's example
inputs).  Every tileable attention site then feeds its q/k/v to a SiteCalibrator and the per-head
masks within ``--budget`` are written to the plan (see docs/calibration.md).
"""
from __future__ import annotations

import argparse
import sys

from ..validation import budget_float, density_float, positive_int
from .model_spec import (
    ModelSpecError,
    add_model_arguments,
    input_dtype,
    is_pipeline,
    load_for_cli,
    load_input_list,
    move_inputs,
    parse_pipe_kwargs,
)


def register(subparsers) -> argparse.ArgumentParser:
    from ..plans import DEFAULT_ERROR_BUDGET

    p = subparsers.add_parser("calibrate", help="calibrate per-head tile masks and write a plan",
                              description="Run MODEL on calibration prompts (or inputs), measure every 3D attention "
                                          "site and head, and write the sparsest masks within the error budget to a "
                                          "plan JSON.")
    add_model_arguments(p)
    p.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (pipelines)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN", help="where to write the plan JSON")
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps per prompt (default: 4)")
    p.add_argument("--every", type=positive_int, default=1, help="keep every K-th transformer call (default: 1)")
    p.add_argument("--max-calls", type=positive_int, default=None, help="stop after this many transformer calls")
    p.add_argument("--budget", type=budget_float, default=DEFAULT_ERROR_BUDGET,
                   help=f"per-head relative L2 error budget on the attention output (default: {DEFAULT_ERROR_BUDGET})")
    p.add_argument("--max-density", type=density_float, default=None, help="also require density <= this (0..1]")
    p.add_argument("--candidates", default=None,
                   help="comma-separated masks to search, e.g. g0w0,g1w0,g1w1,dense (default: g0..4 x w0..2 + dense)")
    p.add_argument("--families", default=None,
                   help="comma-separated mask families to search (default: tile,win3d,spatial; 'tile' = frame tiles only)")
    p.add_argument("--step-ranges", type=int, default=1,
                   help="at most this many ranges of denoising steps with their own masks (default: 1 = same masks "
                        "at every step)")
    p.add_argument("--selection", choices=("head", "tile-capped"), default="head",
                   help="how a site's heads share the budget: head = each its sparsest mask within it (default); "
                        "tile-capped = also no site errs more than frame tiles alone would (docs/calibration.md)")
    p.add_argument("--tile-tokens", type=int, default=None,
                   help="tokens per token tile of window families (default: 128, or a quarter frame on small frames)")
    p.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="save statistics here after every transformer call; rerun with it to resume after a crash")
    p.add_argument("--seed", type=int, default=0, help="seed of the pipeline's noise (prompt i uses seed + i)")
    p.add_argument("--output-psnr", type=float, default=None, metavar="DB",
                   help="then run the calibration prompts (a bare module: its inputs) under the plan and give heads "
                        "back to dense attention until the output keeps this PSNR against dense "
                        "(docs/calibration.md, 'The output check'; default: no check)")
    p.add_argument("--heatmaps", metavar="DIR", help="also write the attention heatmaps of each site into DIR")
    p.set_defaults(func=run)
    return p


def _settings(args):
    from ..calibration import CalibrationSettings
    from ..validation import check_candidates

    cands = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates is not None else None
    check_candidates(cands, "--candidates")
    fams = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    settings = CalibrationSettings(error_budget=args.budget, max_density=args.max_density, candidates=cands,
                                   families=fams, step_ranges=args.step_ranges, tile_tokens=args.tile_tokens,
                                   checkpoint=args.checkpoint, selection=args.selection)
    settings.candidate_masks()  # validates the names
    if fams is not None:
        from ..masks.base import known_families

        unknown = [f for f in fams if f not in known_families()]
        if unknown:
            raise ValueError(f"unknown mask families {unknown}: known are {sorted(known_families())}")
    return settings


def _check_outputs(args) -> None:
    """The plan and heatmap destinations are checked before the model loads, not after calibration."""
    from ..validation import check_input_file, check_output_dir, check_output_file

    check_output_file(args.output, "plan file (-o)")
    if args.heatmaps:
        check_output_dir(args.heatmaps, "--heatmaps directory")
    if args.prompts:
        check_input_file(args.prompts, "prompts file", text=True)


def collect_inputs(obj, example, args, settings) -> list[dict]:
    """The transformer's forward kwargs to calibrate on; fills the settings' bookkeeping fields."""
    from ..calibration.inputs import capture_transformer_inputs, read_prompts
    from ..validation import check_input_file, check_prompts_known

    if is_pipeline(obj):
        if not args.prompts:
            raise ModelSpecError(f"{args.model} is a pipeline: pass --prompts FILE (one prompt per line)")
        prompts = read_prompts(check_input_file(args.prompts, "prompts file", text=True))
        check_prompts_known(obj, prompts)
        inputs = capture_transformer_inputs(obj, prompts, num_inference_steps=args.steps, every=args.every,
                                            max_calls=args.max_calls, device=None, seed=args.seed,
                                            **parse_pipe_kwargs(args.pipe_kwargs))
        settings.num_prompts, settings.num_inference_steps = len(prompts), args.steps
    else:
        if args.prompts:
            raise ModelSpecError(f"{args.model} is a bare module, not a pipeline: prompts cannot be run; pass "
                                 "--inputs FILE with its forward kwargs instead")
        inputs = load_input_list(args.inputs) if args.inputs else ([example] if example is not None else None)
        if not inputs:
            raise ModelSpecError(f"{args.model} is a bare module: pass --inputs FILE (torch.save'd forward kwargs, "
                                 "a dict or a list of dicts) or use a 'module:factory' returning (model, inputs)")
        inputs = [move_inputs(i, args.device, input_dtype(args)) for i in inputs[:: args.every]][: args.max_calls]
    settings.num_inputs = len(inputs)
    return inputs


def _check_output(obj, plan, inputs, args):
    """The output check on the new plan: the pipeline's prompts again (same steps, seed and pipeline kwargs), or a
    bare module's calibration inputs."""
    from ..api import check_output
    from ..calibration.inputs import read_prompts

    # a plan file may run on any device: every tiled site is checked sparse, whatever this machine's timings say
    if is_pipeline(obj):
        return check_output(obj, plan, args.output_psnr, calib_prompts=read_prompts(args.prompts), cost_model="always",
                            calib_steps=args.steps, calib_seed=args.seed, calib_kwargs=parse_pipe_kwargs(args.pipe_kwargs))
    return check_output(obj, plan, args.output_psnr, calib_inputs=inputs, cost_model="always")


def run(args) -> int:
    from ..api import calibrate_model
    from ..plans.show import format_table, write_heatmaps

    try:
        settings = _settings(args)
        _check_outputs(args)
        if args.output_psnr is not None:
            from ..validation import check_number

            check_number("--output-psnr", args.output_psnr, minimum=0, min_open=True)
        obj, example = load_for_cli(args)
        inputs = collect_inputs(obj, example, args, settings)
    except (ModelSpecError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plan = calibrate_model(obj, inputs, settings)
    if args.output_psnr is not None:
        plan = _check_output(obj, plan, inputs, args)
    path = plan.save(args.output)
    sys.stdout.write(format_table(plan))
    print(f"\nplan written to {path}")
    if args.heatmaps:
        written = write_heatmaps(plan, args.heatmaps)
        print(f"wrote {len(written)} heatmap(s) to {args.heatmaps}")
    return 0
