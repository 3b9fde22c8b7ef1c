"""Export the tile-rewritten transformer: ONNX (standard operators, any runtime) and TensorRT.

* :func:`to_onnx` -- ``torch.export`` + tile rewrite + ``torch.onnx.export(dynamo=True)`` with an exact
  standard-ONNX translation of ``vdit::tile_attention`` (or a ``vdit.TileAttention`` custom node);
* :class:`OnnxRunner` -- ONNX Runtime session that enforces the export's input contract;
* :func:`check_export` -- ONNX Runtime vs the PyTorch rewritten model: error and latency;
* :func:`to_tensorrt` -- a TensorRT engine through torch-tensorrt (tile op decomposed to ATen ops).

Heavy optional imports (onnx, onnxscript, onnxruntime, torch_tensorrt) happen on first use.
See docs/export.md.
"""
from __future__ import annotations

from .errors import DynamicFramesError, ExportError, MissingDependencyError, ShapeError

__all__ = ["DynamicFramesError", "ExportError", "MissingDependencyError", "ShapeError", "to_onnx", "read_metadata", "OnnxRunner",
           "check_export", "to_tensorrt"]


def __getattr__(name):
    if name in ("to_onnx", "read_metadata"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name == "OnnxRunner":
        from .runner import OnnxRunner

        return OnnxRunner
    if name == "check_export":
        from .check import check_export

        return check_export
    if name == "to_tensorrt":
        from .tensorrt import to_tensorrt

        return to_tensorrt
    raise AttributeError(f"module 'vdit_compile.export' has no attribute {name!r}")
