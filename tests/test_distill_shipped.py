"""The shipped few-step students (vdit_compile/distill/weights/embedded-s*): they load, rewrite and sample.

The quality and speed figures of these weights come from the GPU runs in docs/distill/MODEL_CARD.md; here
the CPU checks that what ships is complete and consistent: its plan fits the embedded model, the sparse
student really runs the tile op on the plan's sites, and its samples stay close to the same student run
with dense attention (the masks change the function a little, not wholesale).
"""
import pytest
import torch

from vdit_compile.distill.pipeline import load_run, shipped_runs

RUNS = shipped_runs()


@pytest.mark.parametrize("segments", sorted(RUNS) or [pytest.param(0, marks=pytest.mark.skip("nothing shipped"))])
def test_shipped_student_samples_and_its_masks_are_live(segments):
    import vdit_compile as vc

    run = RUNS[segments]
    sparse = load_run(run, device="cpu", backend="eager")
    dense = load_run(run, device="cpu", sparse=False)
    assert sparse.sparse and sparse.default_steps == segments
    prompt = ["a large red circle moving right steadily over a black background"]
    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    a = sparse(prompt, num_inference_steps=segments, generator=g()).frames
    b = dense(prompt, num_inference_steps=segments, generator=g()).frames
    assert a.shape == (1, 16, 3, 32, 32) and torch.isfinite(a).all()
    tiled = [s for s in vc.sites_of(sparse.transformer) if s.tileable]
    assert tiled, "the shipped plan tiles no site"
    plan = vc.plan_of(sparse.transformer)
    assert any(m.name != "dense" for s in plan.tiled_sites() for m in s.masks)
    diff = (a - b).abs().mean().item()
    assert 0 < diff < 0.05, diff  # sparse != dense, yet the same video
