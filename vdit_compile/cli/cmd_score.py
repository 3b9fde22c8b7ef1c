"""``vdit-compile score TARGET``: the quality scorecard of a sampler (table + optional JSON).

TARGET is ``embedded`` (the shipped model), a distillation run directory (``tools/distill.py --out``),
or any model spec the CLI accepts.  The reference for PSNR/SSIM is the target's dense many-step
teacher (``--reference-steps``, default 50) on the same prompts and seeds; ``--reference-clips F.pt``
caches it (reused when prompts, seeds, steps and guidance match).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..validation import nonnegative_int, positive_int


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("score", help="quality scorecard of a pipeline + settings (table and JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="'embedded', a distillation run dir, or a model spec")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 50, or the run's few-step count)")
    p.add_argument("--plan", default=None, help="apply this plan JSON (tile-sparse attention) before sampling")
    p.add_argument("--prompts", type=positive_int, default=24, help="number of held-out prompts (one clip each); default 24")
    p.add_argument("--seed-offset", type=nonnegative_int, default=0, help="use held-out prompts/seeds from this index on")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--reference-steps", type=positive_int, default=50, help="steps of the dense teacher reference (default 50)")
    p.add_argument("--no-reference", action="store_true", help="skip the teacher reference (no PSNR/SSIM)")
    p.add_argument("--reference-clips", type=Path, default=None, help="cache file (.pt) for the teacher's clips")
    p.add_argument("--batch-size", type=positive_int, default=1, help="clips per pipeline call (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier weights dir (default: shipped)")
    p.add_argument("--json", type=Path, default=None, help="also write the scorecard as JSON here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from ..eval import load_classifier, prompt_set, render_table, score_clips, to_json
    from ..eval.reference import reference_clips
    from ..eval.sampling import sample
    from ..eval.scorecard import card_header
    from ..eval.targets import TargetError, apply_plan, resolve_target
    from ..validation import check_device, check_output_file

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
        if args.json:
            check_output_file(args.json, "--json file")
        target = resolve_target(args.target, device)
        steps = args.steps if args.steps is not None else target.default_steps
        from ..models.worlds import world_of_pipe

        world = world_of_pipe(target.pipe)  # the textured world's model gets its own prompts and classifier
        ps = prompt_set(args.prompts, args.seed_offset, world=world)
        clf = load_classifier(args.classifier, world=world) if args.classifier else load_classifier(world=world)
        ref = None
        same_as_reference = target.is_teacher and args.plan is None and steps == args.reference_steps
        if not args.no_reference and not same_as_reference:
            ref = reference_clips(target.teacher, ps, args.reference_steps, args.guidance, args.batch_size,
                                  cache=args.reference_clips, key=args.target)
        pipe = apply_plan(target.pipe, args.plan)
    except (TargetError, FileNotFoundError, ValueError) as exc:
        print(f"vdit-compile score: error: {exc}", file=sys.stderr)
        return 2
    print(f"scoring {target.description}: {steps} steps, {len(ps)} prompts on {device}"
          + (f", plan {args.plan}" if args.plan else ""), file=sys.stderr)
    samples = sample(pipe, ps.prompts, ps.seeds, steps, args.guidance, args.batch_size, desc=f"{args.target} ({steps} steps)")
    if same_as_reference and not args.no_reference:
        ref = samples.clips  # the dense teacher at its own settings: its own reference
    card = card_header(pipe, f"{args.target}" + (" + plan" if args.plan else ""), steps, args.guidance, len(ps),
                       args.batch_size, {"plan": args.plan, "reference_steps": None if args.no_reference else args.reference_steps})
    card.update(score_clips(samples.clips, ps, ref, clf))
    card["seconds_per_video"], card["first_batch_seconds"] = samples.seconds_per_video, samples.first_batch_seconds
    print(render_table(card))
    print(f"device: {card['device']}; wall time per video {card['seconds_per_video']:.2f} s (first batch "
          f"{card['first_batch_seconds']:.2f} s)")
    if args.json:
        to_json(card, args.json)
        print(f"wrote {args.json}")
    return 0
