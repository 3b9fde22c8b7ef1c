"""Optional dependencies: one place that imports them and one message that says what to install.

The extras of ``pyproject.toml`` (``onnx``, ``trt``, ``triton``, ``fp8``) stay optional: nothing imports
them at package import; each feature calls :func:`require` where it first needs one (lazy), or
:func:`optional` where it has a fallback (Triton kernels -> the torch reference).  A missing one raises
:class:`MissingDependencyError` naming the feature, the module and the exact ``pip install`` line, instead
of a bare ``ModuleNotFoundError`` from deep inside a trace.  Our own subpackages are never guarded: they
ship together.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: top-level module -> the pyproject.toml extra that installs it (tests check this against pyproject.toml)
EXTRAS = {
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "torch_tensorrt": "trt",
    "tensorrt": "trt",
    "triton": "triton",
    "torchao": "fp8",
}


def install_hint(extra: str) -> str:
    """The pip line installing one extra of vdit-compile."""
    return f'pip install "vdit-compile[{extra}]"'


class MissingDependencyError(ImportError):
    """An optional dependency of one feature is not installed (or fails to import); the message says what to install."""

    def __init__(self, what: str, extra: str, exc: BaseException | None = None):
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        super().__init__(f"{what} is not available here{detail}. Install it with: {install_hint(extra)}")
        self.extra = extra


def _extra_of(name: str, extra: str | None) -> str:
    if extra is not None:
        return extra
    top = name.partition(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{name!r} is not an optional dependency of vdit-compile (known: {', '.join(EXTRAS)})")
    return EXTRAS[top]


def require(name: str, extra: str | None = None, why: str = "", error: type[MissingDependencyError] = MissingDependencyError
            ) -> ModuleType:
    """``import name``, or raise ``error`` saying that ``why`` needs it and which extra installs it.

    ``extra`` defaults to the extra of :data:`EXTRAS`; ``error`` lets a subsystem raise its own subclass (export
    raises one that is also an ``ExportError``, which the CLI reports plainly)."""
    extra = _extra_of(name, extra)
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (TensorRT, Triton) raising at import
        raise error(f"{why}: {name}" if why else name, extra, exc) from exc


def optional(name: str) -> ModuleType | None:
    """``import name``, or ``None`` when it is not installed (for features with a fallback)."""
    _extra_of(name, None)
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - as in require: a broken install is as good as none
        return None


def available(name: str) -> bool:
    """Whether ``name`` is installed, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
