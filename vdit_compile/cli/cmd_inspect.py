"""``vdit-compile inspect MODEL``: list the attention sites vdit-compile finds and what it would do with them.

For a pipeline, one tiny denoising step is run to capture the transformer's real forward kwargs;
for a bare module the kwargs come from ``--inputs`` or from the ``module:factory`` spec.
"""
from __future__ import annotations

import argparse
import json
import sys

from .model_spec import (
    ModelSpecError,
    add_model_arguments,
    input_dtype,
    is_pipeline,
    load_for_cli,
    move_inputs,
    parse_pipe_kwargs,
)

DEFAULT_PROMPT = "a red circle moving left"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="list a model's attention sites, their kind and token layout",
                              description="Capture MODEL's transformer and print every attention site found: its kind "
                                          "(3D video self-attention, joint text+video, cross, spatial, temporal, other), "
                                          "token layout and whether it can be tiled.")
    add_model_arguments(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the single pipeline step used to get inputs")
    p.add_argument("--json", action="store_true", help="print the sites as JSON instead of a table")
    p.set_defaults(func=run)
    return p


def example_inputs_for(obj, example, args) -> dict:
    """Forward kwargs to trace with: given ones, or one captured pipeline step (1 inference step)."""
    if example is not None:
        return move_inputs(example, args.device, input_dtype(args))
    if is_pipeline(obj):
        from ..calibration.inputs import capture_transformer_inputs

        recs = capture_transformer_inputs(obj, [args.prompt], num_inference_steps=1, max_calls=1, device=None,
                                          progress=False, **parse_pipe_kwargs(args.pipe_kwargs))
        return recs[0]
    raise ModelSpecError(f"{args.model} is a bare module: pass --inputs FILE (torch.save'd forward kwargs) or use a "
                         "'module:factory' that returns (model, example_inputs)")


def format_sites(sites) -> str:
    from ..plans import TILEABLE_KINDS

    header = ["site", "kind", "layout", "heads x dim", "tileable", "reason"]
    rows = [[s.name, s.kind, s.layout.describe() if s.layout is not None else "-", f"{s.num_heads} x {s.head_dim}",
             "yes" if s.kind in TILEABLE_KINDS and s.layout is not None else "no", s.reason or ""] for s in sites]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    n_tile = sum(r[4] == "yes" for r in rows)
    lines = [f"{len(rows)} attention site(s), {n_tile} tileable", "", fmt(header), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(r) for r in rows]) + "\n"


def sites_to_json(sites) -> list[dict]:
    return [{"name": s.name, "kind": s.kind, "layout": s.layout.to_dict() if s.layout is not None else None,
             "num_heads": s.num_heads, "head_dim": s.head_dim, "reason": s.reason} for s in sites]


def run(args) -> int:
    from .. import inspect_model

    try:
        obj, example = load_for_cli(args)
        inputs = example_inputs_for(obj, example, args)
    except (ModelSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sites = inspect_model(obj, inputs)
    if args.json:
        print(json.dumps(sites_to_json(sites), indent=1))
    else:
        sys.stdout.write(format_sites(sites))
    return 0
