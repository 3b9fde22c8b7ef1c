"""``OptimizeConfig.fuse_qkv``: q/k/v projections fused through diffusers' ``fuse_qkv_projections`` before FP8 and the
compile.  Against the same optimised model unfused (fp32: equal up to GEMM accumulation order), with FP8 emulated
(the fused linear is the one quantised; the replaced ones are reported, the cross-attention's fused keys/values stay
high precision), undone by ``restore``; a model without the method is left unfused with a warning."""
import pytest
import torch
from calib_helpers import frame_local_dit, tiny_wan

import vdit_compile
from vdit_compile import TileMask
from vdit_compile.wholestep import report_of


def _run(model, example, **opts):
    vdit_compile.optimize(model, plan=TileMask(1, 0), backend="eager", progress=False, cost_model="always", **opts)
    try:
        with torch.no_grad():
            return model(**example)[0], report_of(model)
    finally:
        vdit_compile.restore(model)


def test_fused_projections_give_the_unfused_output_and_restore_unfuses():
    model, example = tiny_wan()
    with torch.no_grad():
        original = model(**example)[0]
    plain, _ = _run(model, example)
    fused, rep = _run(model, example, fuse_qkv=True)
    assert rep["fuse_qkv"] == {"replaced_linears": 2 * (3 + 2)}  # 2 blocks: q, k, v (self) + k, v (cross)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert (fused - original).abs().max() > 0  # the tile mask ran: not a no-op comparison
    attn = model.blocks[0].attn1
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")  # restore unfused
    with torch.no_grad():
        torch.testing.assert_close(model(**example)[0], original, rtol=0, atol=0)


def test_fp8_quantises_the_fused_projection_and_reports_the_replaced_ones():
    model, example = tiny_wan()
    plain, rep_plain = _run(model, example, fp8="emulate")
    fused, rep = _run(model, example, fp8="emulate", fuse_qkv=True)
    q, kept = rep["fp8"]["quantized"], rep["fp8"]["kept"]
    assert "blocks.0.attn1.to_qkv" in q and "blocks.0.attn1.to_q" not in q
    assert kept["blocks.0.attn1.to_q"].startswith("replaced by a fused projection")
    assert kept["blocks.0.attn2.to_kv"].startswith("reads only the condition tokens")
    assert "blocks.0.attn2.to_q" in q and "blocks.0.attn1.to_q" in rep_plain["fp8"]["quantized"]
    # row-wise activation scales and per-output-channel weight scales do not change when the weights are stacked
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_a_model_without_the_method_stays_unfused_with_a_warning():
    model, example = frame_local_dit()
    with torch.no_grad():
        want = model(**example)
    with pytest.warns(UserWarning, match="no fuse_qkv_projections"):
        vdit_compile.optimize(model, plan=TileMask(dense=True), backend="eager", progress=False, fuse_qkv=True)
    try:
        assert report_of(model)["fuse_qkv"] is None
        with torch.no_grad():
            torch.testing.assert_close(model(**example), want, rtol=1e-5, atol=1e-5)
    finally:
        vdit_compile.restore(model)
