"""Quality scorecard: metrics, the prompt-adherence classifier and :func:`scorecard`.

Used to price every optimisation (tile masks, few-step distillation) in measured quality.
"""
from __future__ import annotations

from . import metrics

__all__ = ["metrics"]
