"""The CLI side of MODEL arguments: argparse options, device checks, loading for a command.

What a model spec *means* lives below the CLI, in :mod:`vdit_compile.models.spec` (re-exported here for the
commands)."""
from __future__ import annotations

import json
from typing import Any

from ..models.spec import (  # noqa: F401  (re-exported for the commands)
    DTYPES,
    SPEC_HELP,
    ModelSpecError,
    is_pipeline,
    load_example_inputs,
    load_input_list,
    load_model,
    load_model_and_inputs,
    move_inputs,
)


def add_model_arguments(parser) -> None:
    """MODEL plus the options every model-loading command takes."""
    parser.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    parser.add_argument("--inputs", metavar="FILE",
                        help="torch.save'd forward kwargs (a dict, or a list of dicts) for a bare transformer module")
    parser.add_argument("--pipe-kwargs", metavar="JSON", default="{}",
                        help='extra pipeline call arguments as JSON, e.g. \'{"num_frames": 5, "height": 64, "width": 64}\'')
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the transformer to this dtype")


def check_cli_device(args) -> None:
    """``--device`` must exist on this machine (``cuda`` without CUDA is refused before the model loads)."""
    from ..validation import check_device

    if getattr(args, "device", None) is not None:
        try:
            check_device(args.device)
        except ValueError as exc:
            raise ModelSpecError(f"--device: {exc}") from None


def parse_pipe_kwargs(text: str) -> dict:
    try:
        kw = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"--pipe-kwargs must be a JSON object, found {text!r}: {exc}") from exc
    if not isinstance(kw, dict):
        raise ModelSpecError(f"--pipe-kwargs must be a JSON object, found {type(kw).__name__}")
    from ..validation import check_pipe_kwargs

    try:
        check_pipe_kwargs(kw, "--pipe-kwargs")
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(str(exc)) from None
    return kw


def input_dtype(args):
    """The dtype ``--dtype`` asks for (``None``: leave inputs as they are)."""
    return DTYPES[args.dtype] if getattr(args, "dtype", None) else None


def load_for_cli(args) -> tuple[Any, dict | None]:
    """Load MODEL, move it to ``--device``/``--dtype``; example kwargs from ``--inputs`` or the factory."""
    check_cli_device(args)
    obj, example = load_model_and_inputs(args.model)
    if args.inputs:
        example = load_example_inputs(args.inputs)
    if hasattr(obj, "to"):
        obj = obj.to(args.device) or obj
    if args.dtype:
        target = obj.transformer if is_pipeline(obj) else obj
        target.to(DTYPES[args.dtype])
    return obj, example


