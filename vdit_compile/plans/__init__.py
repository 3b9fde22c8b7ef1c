"""Versioned JSON plans: per-site, per-head tile masks, their provenance and validation."""
from .fingerprint import model_class_name, model_fingerprint, structure_summary, unwrap_model
from .plan import (
    DEFAULT_ERROR_BUDGET,
    PLAN_FORMAT,
    PLAN_VERSION,
    TILEABLE_KINDS,
    Plan,
    PlanError,
    PlanMismatchError,
    SitePlan,
    StepRange,
    default_tile,
    layout_differences,
)

__all__ = [
    "DEFAULT_ERROR_BUDGET", "PLAN_FORMAT", "PLAN_VERSION", "TILEABLE_KINDS", "Plan", "PlanError",
    "PlanMismatchError", "SitePlan", "StepRange", "default_tile", "layout_differences", "model_class_name", "model_fingerprint",
    "structure_summary", "unwrap_model",
]
