"""Errors of the export path (all subclass :class:`ExportError`, a ``ValueError``, so the CLI reports them plainly)."""
from __future__ import annotations

from .. import _optional


class ExportError(ValueError):
    """The export cannot be made as asked (bad plan, unsupported site, output exists, ...)."""


class ShapeError(ExportError):
    """An input that the exported graph cannot serve (a fixed dimension differs, frames out of range)."""


class DynamicFramesError(ExportError):
    """The model cannot be exported with a dynamic frame count in the asked range (it specialises or bounds it).

    ``suggested`` is torch.export's suggested ``(min, max)`` for the frame dimension, or ``None``: read once,
    where torch's error is caught (:func:`vdit_compile.export.graph.export_program`), so callers branch on this
    type and field instead of on message text."""

    def __init__(self, message: str, suggested: tuple[int | None, int | None] | None = None):
        super().__init__(message)
        self.suggested = suggested


class MissingDependencyError(_optional.MissingDependencyError, ExportError):  # the first base builds the message
    """An optional dependency of one export target is not installed; the message says what to install
    (raised by :func:`vdit_compile._optional.require` with ``error=MissingDependencyError``)."""
