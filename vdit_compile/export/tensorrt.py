"""``to_tensorrt``: a TensorRT engine of the plan-rewritten transformer through torch-tensorrt's dynamo path.

Choice for the tile op: **decomposition**, not a plugin.  Before conversion every
``vdit::tile_attention`` is replaced by :func:`~.decompose.band_tile_attention` (index, cat, matmul,
logsumexp, exp), which torch-tensorrt's converters handle and which is exact and never builds an
``L x L`` tensor for a sparse head group.  Why not the auto-generated plugin from the
``torch.library`` op + Triton kernel (``torch_tensorrt.dynamo.conversion.plugins``): it needs a
Triton kernel per precision and an AOT-compiled plugin per GPU architecture, and was not runnable
anywhere here (TensorRT is not installed on the CPU or the GPU machine), whereas the decomposition
is the same algorithm the ONNX path runs and is tested on CPU (``tests/test_export_tensorrt.py``).

The engine is written as TensorRT's serialized bytes to ``path``; the plan, fingerprint, precision
and input contract go next to it in ``<path>.json`` (an engine has no metadata field of its own).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from .._optional import require
from ..plans import model_class_name, model_fingerprint, unwrap_model
from .adapters import export_adapters
from .decompose import decompose_tile_attention
from .errors import ExportError, MissingDependencyError
from .graph import export_program, rewrite_sites
from .plan_sites import resolve_plan, site_specs

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def require_torch_tensorrt():
    """Import torch_tensorrt or raise :class:`MissingDependencyError` naming ``vdit-compile[trt]``."""
    return require("torch_tensorrt", why="TensorRT export (torch-tensorrt and tensorrt)", error=MissingDependencyError)


def prepare_for_tensorrt(model, example_inputs: Mapping[str, Any], plan=None):
    """The rewritten, tile-op-decomposed ExportedProgram TensorRT converts, with the plan and site facts.

    Runs without TensorRT (tests check it on CPU against the rewritten model).
    """
    module = unwrap_model(model)
    plan = resolve_plan(model, example_inputs, plan)
    with export_adapters(module, example_inputs):
        ep = export_program(module, example_inputs)
        facts = rewrite_sites(ep, site_specs(plan))
    return decompose_tile_attention(ep), plan, facts


def to_tensorrt(model, example_inputs: Mapping[str, Any], path, plan=None, *, precision: str = "fp16",
                overwrite: bool = False, device: str = "cuda", workspace_size: int = 0) -> Path:
    """Build and save a TensorRT engine (see module doc); returns the engine path."""
    trt = require_torch_tensorrt()
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {sorted(PRECISIONS)}, found {precision!r}")
    from .onnx import check_output_path

    path = check_output_path(path, overwrite)
    module = unwrap_model(model)
    param = next(module.parameters(), None)
    before = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    dtype = PRECISIONS[precision]
    inputs = {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
              else (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in example_inputs.items()}
    module.to(device=device, dtype=dtype).eval()
    try:
        ep, plan, facts = prepare_for_tensorrt(module, inputs, plan)
        convert = trt.dynamo.convert_exported_program_to_serialized_trt_engine
        # the module is already cast to `dtype`: explicit typing (newer releases) keeps it; older ones take
        # enabled_precisions.  Only pass what this torch-tensorrt version accepts.
        options = {"arg_inputs": (), "kwarg_inputs": inputs, "enabled_precisions": {dtype}, "use_explicit_typing": True,
                   "workspace_size": workspace_size}
        params = inspect.signature(convert).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            options = {k: v for k, v in options.items() if k in params}
        if "use_explicit_typing" in options:
            options.pop("enabled_precisions", None)
        engine = convert(ep, **options)
    finally:
        module.to(device=before[0], dtype=before[1])  # the caller's model is left as it was
    from ..atomic import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(path, bytes(engine))
    meta = {"version": __version__, "model_class": model_class_name(module), "fingerprint": model_fingerprint(module),
            "precision": precision, "plan": plan.to_dict(), "sites": facts,
            "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in inputs.items() if isinstance(v, torch.Tensor)},
            "tile_attention": "decomposed (band gather + matmul + logsumexp)"}
    atomic_write_text(Path(str(path) + ".json"), json.dumps(meta, indent=1) + "\n")
    return path


#: ``--trt --check`` bounds on the relative L2 error vs the fp32 PyTorch rewritten model, per precision.
TRT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


class TensorRTRunner:
    """Run a serialized engine written by :func:`to_tensorrt` (TensorRT 10 tensor API, CUDA tensors)."""

    def __init__(self, path):
        self.trt = trt = require("tensorrt", why="TensorRT", error=MissingDependencyError)
        self.path = Path(path)
        self.meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{path} is not a TensorRT engine this TensorRT version can load")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, **inputs) -> list[torch.Tensor]:
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        by_name = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        keep = []
        for i, name in enumerate(self.input_names):
            t = by_name.get(name, tensors[i] if i < len(tensors) else None)
            if t is None:
                raise ExportError(f"engine input {name!r} has no matching tensor among {list(by_name)}")
            want = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            t = t.to(device="cuda", dtype=want).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, device="cuda", dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ExportError("TensorRT execution failed")
        torch.cuda.synchronize()
        return outs


def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dt]


def check_tensorrt(path, model, example_inputs: Mapping[str, Any], plan, seed: int = 1234) -> tuple[float, bool]:
    """Relative L2 error of the engine vs the fp32 PyTorch rewritten model on fresh inputs, and pass/fail."""
    from ..plans import Plan
    from .check import _flat_outputs, fresh_inputs, rewritten_reference

    runner = TensorRTRunner(path)
    if not isinstance(plan, Plan):
        plan = Plan.from_dict(runner.meta["plan"])
    inputs = fresh_inputs({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}, seed)
    reference, _ = rewritten_reference(unwrap_model(model), plan)
    with torch.no_grad():
        ref = _flat_outputs(reference(**inputs))[0]
        got = runner(**inputs)[0].float().cpu().numpy()
    err = float(((got - ref) ** 2).sum() ** 0.5 / max(float((ref ** 2).sum() ** 0.5), 1e-30))
    return err, err < TRT_TOLERANCE[runner.meta["precision"]]
