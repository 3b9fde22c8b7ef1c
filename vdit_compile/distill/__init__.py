"""Few-step, tile-sparse distillation: MLCD -> mask search -> knowledge distillation.

``python tools/distill.py --model embedded --out runs/fewstep`` runs it; :func:`load_run` returns the
few-step pipeline of a run.  See docs/distill/README.md.
"""
from __future__ import annotations

from .config import DistillConfig, DistillConfigError
from .pipeline import FewStepPipeline, export_run, load_run, load_shipped, shipped_run, shipped_runs
from .schedule import FewStepSchedule

__all__ = ["DistillConfig", "DistillConfigError", "FewStepPipeline", "FewStepSchedule", "export_run", "load_run", "load_shipped",
           "shipped_run", "shipped_runs"]
