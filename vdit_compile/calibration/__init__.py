"""Calibration: capture the transformer's inputs, measure every 3D attention site, choose masks."""
from .collector import SiteCalibrator, SiteResult, default_candidates
from .inputs import capture_transformer_inputs, read_prompts
from .run import CalibrationSettings, build_plan, prepare_verification
from .steps import choose_step_ranges

__all__ = [
    "SiteCalibrator", "SiteResult", "default_candidates", "capture_transformer_inputs", "read_prompts",
    "CalibrationSettings", "build_plan", "prepare_verification", "choose_step_ranges",
]
