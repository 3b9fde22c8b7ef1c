"""optimize(pipe, calib_prompts) on the embedded pipeline (random tiny weights): the README's main job, small."""
from __future__ import annotations

import pytest
import torch

import vdit_compile as vc
from vdit_compile.capture import state_of

embedded = pytest.importorskip("vdit_compile.models.embedded")


def test_optimize_pipeline_calibrates_and_generates():
    pipe = embedded.load_pipeline(tiny=True, weights=None)
    with torch.no_grad():
        dense = pipe("a red circle moving left", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).frames
    out = vc.optimize(pipe, calib_prompts=["a blue square bouncing"], calib_steps=1, error_budget=0.5, progress=False,
                      cost_model="always")  # every tiled site rewritten, whatever this machine's timings
    assert out is pipe
    plan = vc.plan_of(pipe)
    assert plan.calibration["num_prompts"] == 1 and plan.tiled_sites()  # loose budget: something is tiled
    with torch.no_grad():
        sparse = pipe("a red circle moving left", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).frames
    assert state_of(pipe.transformer).rewritten == {s.name for s in plan.tiled_sites()}
    assert sparse.shape == dense.shape and torch.isfinite(sparse).all()
    vc.restore(pipe)
    assert state_of(pipe.transformer) is None
