"""``OnnxRunner``: an ONNX Runtime session that checks inputs against the export's contract first.

The exported file records (metadata ``vdit_compile.inputs``) each input's dtype and shape, with
fixed dimensions as ints and a dynamic frame axis as ``{"min", "max", "multiple"}``.  A mismatching
input is refused with a :class:`ShapeError` that says which dimension is fixed at what, instead of
an opaque runtime error or, worse, a silently wrong mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .._optional import require
from .errors import MissingDependencyError, ShapeError
from .onnx import read_metadata


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def describe_contract(inputs: list[dict]) -> str:
    parts = []
    for spec in inputs:
        dims = ["{}..{}{}".format(d["min"], d["max"] if d["max"] is not None else "", f" (x{d['multiple']})" if d["multiple"] > 1 else "")
                if isinstance(d, dict) else str(d) for d in spec["shape"]]
        parts.append(f"{spec['name']}: {spec['dtype']}[{', '.join(dims)}]")
    return "; ".join(parts)


def check_array(spec: dict, arr: np.ndarray) -> None:
    """Raise :class:`ShapeError` unless ``arr`` fits one input's contract."""
    name, shape = spec["name"], spec["shape"]
    if str(arr.dtype) != spec["dtype"]:
        raise ShapeError(f"input {name}: expected dtype {spec['dtype']}, found {arr.dtype}")
    if arr.ndim != len(shape):
        raise ShapeError(f"input {name}: expected {len(shape)} dimensions {shape}, found shape {tuple(arr.shape)}")
    dynamic = [i for i, d in enumerate(shape) if isinstance(d, dict)]
    for i, (want, got) in enumerate(zip(shape, arr.shape)):
        if isinstance(want, dict):
            lo, hi, mult = want["min"], want["max"], want["multiple"]
            if (lo is not None and got < lo) or (hi is not None and got > hi) or got % mult:
                raise ShapeError(
                    f"input {name}: dimension {i} (frames) must be in {lo}..{hi if hi is not None else 'inf'}"
                    + (f" and a multiple of {mult}" if mult > 1 else "") + f", found {got}"
                )
        elif got != want:
            hint = (f"only dimension {dynamic} is dynamic" if dynamic else "no dimension is dynamic in this export")
            raise ShapeError(
                f"input {name}: dimension {i} is fixed at {want} in this export, found {got} (shape {tuple(arr.shape)}; "
                f"{hint}); re-export with matching --frames/--height/--width, or --dynamic-frames for the frame axis"
            )


class OnnxRunner:
    """Run an exported transformer with ONNX Runtime: ``runner(**forward_kwargs) -> {output name: array}``."""

    def __init__(self, path, providers=None, threads: int | None = None):
        ort = require("onnxruntime", why="ONNX Runtime", error=MissingDependencyError)
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        if "inputs" not in self.meta:
            raise ShapeError(f"{self.path} was not written by vdit-compile export (no vdit_compile.inputs metadata)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        self.inputs: list[dict] = self.meta["inputs"]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Match forward kwargs to the graph inputs (nested kwargs by leaf order) and check every one."""
        names = [s["name"] for s in self.inputs]
        direct = {k: v for k, v in inputs.items() if k in names}
        nested = [leaf for k, v in inputs.items() if k not in names and not isinstance(v, torch.Tensor)
                  for leaf in pytree.tree_leaves(v) if isinstance(leaf, (torch.Tensor, np.ndarray))]
        unknown = [k for k, v in inputs.items() if k not in names and isinstance(v, (torch.Tensor, np.ndarray))]
        if unknown:
            raise ShapeError(f"unexpected input(s) {unknown}; this export takes: {describe_contract(self.inputs)}")
        feeds = {}
        for spec in self.inputs:
            if spec["name"] in direct:
                arr = _np(direct[spec["name"]])
            elif nested:
                arr = _np(nested.pop(0))
            else:
                raise ShapeError(f"missing input {spec['name']!r}; this export takes: {describe_contract(self.inputs)}")
            check_array(spec, arr)
            feeds[spec["name"]] = arr
        return feeds

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        outs = self.session.run(None, self.feeds(inputs))
        return dict(zip(self.output_names, outs))
