"""``vdit-compile export MODEL --plan plan.json --onnx out.onnx | --trt out.engine``.

Exports the plan-rewritten transformer (tile attention included) to ONNX (standard operators, any
runtime; ``--check`` runs ONNX Runtime against PyTorch) or to a TensorRT engine (torch-tensorrt).
See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys

from ..validation import positive_int
from .model_spec import ModelSpecError, add_model_arguments, load_for_cli


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export the tile-rewritten transformer to ONNX or TensorRT",
        description="Export MODEL's transformer, rewritten with a tile plan, to ONNX (standard operators; --check "
                    "compares ONNX Runtime with PyTorch) or to a TensorRT engine. Sizes (--frames/--height/--width) "
                    "are the transformer's hidden_states sizes; every other dimension is fixed by the example inputs.")
    add_model_arguments(p)
    p.add_argument("--plan", metavar="PLAN",
                   help="plan JSON from `vdit-compile calibrate`, or a mask name of any family (g1w0, win3d-t1h1w1, spatial-h1w1-g1, ...) applied to every tileable site")
    p.add_argument("--onnx", metavar="OUT.onnx", help="write an ONNX file")
    p.add_argument("--trt", metavar="OUT.engine", help="write a TensorRT engine (needs vdit-compile[trt])")
    p.add_argument("--frames", type=positive_int, help="frames of hidden_states (transformer input units)")
    p.add_argument("--height", type=positive_int, help="height of hidden_states")
    p.add_argument("--width", type=positive_int, help="width of hidden_states")
    p.add_argument("--dynamic-frames", action="store_true", help="ONNX: make the frame axis dynamic where the model allows")
    p.add_argument("--min-frames", type=positive_int, help="smallest latent frame count of a dynamic export (default: max g + 1)")
    p.add_argument("--max-frames", type=positive_int, help="largest latent frame count of a dynamic export (default: model bound)")
    p.add_argument("--custom-op", action="store_true",
                   help="ONNX: emit vdit.TileAttention custom-domain nodes (for runtimes with a fused kernel) instead "
                        "of standard operators; ONNX Runtime cannot run such a file without that kernel")
    p.add_argument("--external-data", action="store_true", help="ONNX: always store weights in OUT.onnx.data "
                   "(automatic above 2 GB)")
    p.add_argument("--check", action="store_true",
                   help="ONNX: run ONNX Runtime (CPU) on fresh random inputs, compare with the PyTorch rewritten model "
                        "(fp32 relative error < 1e-4) and report latencies; TensorRT: run the engine and compare")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="TensorRT: fp16 engine")
    prec.add_argument("--bf16", action="store_true", help="TensorRT: bf16 engine")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--prompt", default="a red circle moving left", help="prompt of the pipeline step that gives inputs")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _preflight(args):
    """Argument errors that need no model: say them before loading anything."""
    if not args.onnx and not args.trt:
        return "nothing to do: pass --onnx OUT.onnx and/or --trt OUT.engine"
    from ..export.onnx import check_output_path
    from .model_spec import check_cli_device

    for out in (args.onnx, args.trt):
        if out:
            check_output_path(out, args.overwrite)  # exists / directory / under a file / read-only: before tracing
    check_cli_device(args)
    if args.plan:
        _check_plan_arg(args.plan)
    if args.check and args.custom_op and not args.trt:
        return "--check runs ONNX Runtime, which has no kernel for vdit.TileAttention: drop --custom-op or --check"
    if args.trt:
        from ..export.tensorrt import require_torch_tensorrt

        require_torch_tensorrt()
    return None


def _check_plan_arg(plan: str) -> None:
    """A --plan that is not a mask name must be a readable plan file (checked before the model loads)."""
    from pathlib import Path

    from ..export.errors import ExportError
    from ..masks.tile import TileMask
    from ..plans import Plan

    try:
        TileMask.parse(plan)
        return
    except (ValueError, TypeError):
        pass
    if not Path(plan).exists():
        raise ExportError(f"plan file {plan} not found (expected a JSON plan from `vdit-compile calibrate` or a mask "
                          "name like g1w0)")
    Plan.load(plan)


def run(args) -> int:
    from ..export.errors import ExportError
    from ..plans import PlanError, PlanMismatchError

    try:
        problem = _preflight(args)
        if problem:
            return _fail(problem)
        from ..export.shapes import resize_inputs
        from ..plans import unwrap_model
        from .cmd_inspect import example_inputs_for

        obj, example = load_for_cli(args)
        inputs = example_inputs_for(obj, example, args)
        inputs = resize_inputs(unwrap_model(obj), inputs, args.frames, args.height, args.width)
        if args.onnx:
            code = _export_onnx(obj, inputs, args)
            if code:
                return code
        if args.trt:
            from ..export.tensorrt import to_tensorrt

            precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
            path = to_tensorrt(obj, inputs, args.trt, args.plan, precision=precision, overwrite=args.overwrite)
            print(f"wrote {path} ({precision}) and {path}.json (plan, fingerprint, inputs)")
            if args.check:
                from ..export.tensorrt import TRT_TOLERANCE, check_tensorrt

                err, ok = check_tensorrt(path, obj, inputs, args.plan)
                print(f"TensorRT check {'OK' if ok else 'FAILED'}: relative L2 error {err:.2e} vs the fp32 PyTorch "
                      f"rewritten model (bound {TRT_TOLERANCE[precision]:.0e} for {precision})")
                if not ok:
                    return _fail("TensorRT output differs from PyTorch beyond the bound")
    except (ExportError, ModelSpecError, PlanError, PlanMismatchError, FileNotFoundError) as exc:
        return _fail(str(exc))
    return 0


def _export_onnx(obj, inputs, args) -> int:
    from ..export.check import check_export
    from ..export.onnx import to_onnx
    from ..export.runner import describe_contract

    res = to_onnx(obj, inputs, args.onnx, args.plan, dynamic_frames=args.dynamic_frames, min_frames=args.min_frames,
                  max_frames=args.max_frames, attention="custom" if args.custom_op else "standard",
                  external_data=True if args.external_data else None, overwrite=args.overwrite)
    print(f"wrote {res.path}" + (f" (+ external data {res.path}.data)" if res.external_data else ""))
    print(f"  tiled sites: {len(res.sites)}: " + ", ".join(f"{k} {'/'.join(sorted(set(v['masks'])))}" for k, v in res.sites.items()))
    print(f"  inputs: {describe_contract(res.inputs)}")
    dyn = any(isinstance(d, dict) for s in res.inputs for d in s["shape"])
    print("  every dimension is fixed except the frame axis shown as min..max" if dyn else
          "  every dimension is fixed (re-export with other --frames/--height/--width, or --dynamic-frames)")
    print(f"  outputs: {', '.join(res.outputs)}")
    if args.check:
        frame_counts = [None]
        frames = next((d for s in res.inputs if s["name"] == "hidden_states" for d in s["shape"] if isinstance(d, dict)), None)
        if frames is not None:  # dynamic: also check at another frame count within the range
            axis = res.inputs[0]["shape"].index(frames) if res.inputs[0]["name"] == "hidden_states" else None
            now = inputs["hidden_states"].shape[axis]
            other = now + frames["multiple"]
            if frames["max"] is not None and other > frames["max"]:
                other = now - frames["multiple"]
            if axis is not None and other >= (frames["min"] or 1):
                frame_counts.append((axis, other))
        for fc in frame_counts:
            report = check_export(res.path, obj, inputs, res.plan, program=res.program, frames=fc)
            print(report.summary())
            if not report.ok:
                return _fail("ONNX Runtime output differs from PyTorch beyond the bound")
    return 0
