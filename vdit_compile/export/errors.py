"""Errors of the export path (all subclass :class:`ExportError`, a ``ValueError``, so the CLI reports them plainly)."""
from __future__ import annotations


class ExportError(ValueError):
    """The export cannot be made as asked (bad plan, unsupported site, output exists, ...)."""


class ShapeError(ExportError):
    """An input that the exported graph cannot serve (a fixed dimension differs, frames out of range)."""


class MissingDependencyError(ExportError, ImportError):
    """An optional dependency of one export target is not installed; the message says what to install."""

    def __init__(self, what: str, extra: str, exc: BaseException | None = None):
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        super().__init__(f"{what} is not available here{detail}. Install it with: pip install \"vdit-compile[{extra}]\"")
        self.extra = extra
