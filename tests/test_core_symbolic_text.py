"""Models that trim or pad text by value: Mochi, HunyuanVideo 1.5, HunyuanVideoFramepack.

Their joint sequence length is symbolic in the Dynamo graph (``nonzero``, boolean indexing,
``[:, :mask.sum()]``); the op gets the text length as a graph value.  Each model is optimized
once and called with two prompts of different valid lengths (same input shapes, so one graph must
serve both; a recompile or a silent dense run would show):
(a) sites/kinds/layouts, the per-call text side, the token-order probe ran;
(b) an all-dense plan through the op equals the original at both lengths;
(c) a sparse plan equals the independent oracle (dense SDPA with the boolean tile mask, and the
model's own padding mask where it passes one) at both lengths, and differs from dense;
(d) parameter gradients equal the oracle's at both lengths.
Plus: the calibrator and plan with varying text length, and the tail-padding path on its own.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from core_models import EXPECTED, TEXT, build_tiny, out_of, reference_output, rel_err, with_valid_text

import vdit_compile as vc
from vdit_compile import TileMask
from vdit_compile.calibration import SiteCalibrator
from vdit_compile.capture import state_of
from vdit_compile.layout import TokenLayout
from vdit_compile.ops import dense_masked_attention
from vdit_compile.runtime.padding import padded_tile_attention, valid_lengths

MODELS = ["mochi", "hunyuan15", "framepack"]
VALID = (TEXT, 5)  # valid text tokens of the two prompts
SPARSE = TileMask(1, 0)
#: HunyuanVideo 1.5 graph-breaks (``if torch.all(image_embeds == 0)``) before its blocks, so the graph with
#: the attention does not hold the video input and the token-order probe cannot run there (docs/core.md).
PROBED = {"mochi", "framepack"}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    name = request.param
    model, kw = build_tiny(name)
    inputs = [with_valid_text(name, kw, n) for n in VALID]
    res = {"name": name}
    with torch.no_grad():
        res["original"] = [out_of(model(**x)) for x in inputs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vc.optimize(model, plan=TileMask(dense=True), backend="eager")
        with torch.no_grad():
            res["dense"] = [out_of(model(**x)) for x in inputs]
    st = state_of(model)
    res["warnings"] = [str(w.message) for w in caught]
    res["sites"], res["rewritten_dense"] = st.site_list(), set(st.rewritten)
    res["notes"] = [n for t in st.templates for n in t.notes]
    vc.optimize(model, plan=SPARSE, backend="eager")
    st = state_of(model)
    res["sparse"], res["grads"], res["graphs"] = [], [], []
    for x in inputs:
        model.zero_grad()
        out = out_of(model(**x))
        out.square().mean().backward()
        res["sparse"].append(out.detach())
        res["grads"].append(_grads(model))
        res["graphs"].append(st.graphs)
    res["rewritten_sparse"] = set(st.rewritten)
    vc.restore(model)
    res["ref"], res["ref_grads"] = [], []
    for x in inputs:
        model.zero_grad()
        ref = reference_output(name, model, x, res["sites"], SPARSE)
        ref.square().mean().backward()
        res["ref"].append(ref.detach())
        res["ref_grads"].append(_grads(model))
    return res


def test_sites_layouts_and_probe(case):
    expect = EXPECTED[case["name"]]
    tiled = [s for s in case["sites"] if s.tileable]
    assert len(tiled) == expect.tiled == 2, [s.describe() for s in case["sites"]]
    for s in tiled:
        lay = s.layout
        assert s.kind == "joint_text_suffix" and lay.dynamic_text == "suffix", s.describe()
        assert (lay.num_frames, lay.height, lay.width, lay.text_prefix, lay.text_suffix) == expect.layout
        assert "text[*]" in lay.describe()
    if case["name"] in PROBED:  # the probe ran on the symbolic graph
        assert case["notes"].count("token order confirmed by probe") == 2, case["notes"]
    assert not [w for w in case["warnings"] if "left dense" in w], case["warnings"]


def test_dense_plan_equals_original_at_both_lengths(case):
    assert case["rewritten_dense"] == {s.name for s in case["sites"] if s.tileable}
    for out, orig in zip(case["dense"], case["original"]):
        assert rel_err(out, orig) < 1e-5


def test_sparse_plan_equals_oracle_at_both_lengths_one_graph(case):
    assert case["rewritten_sparse"] == {s.name for s in case["sites"] if s.tileable}
    assert case["graphs"][0] == case["graphs"][1], "the second prompt length recompiled the model"
    assert rel_err(case["original"][0], case["original"][1]) > 1e-4  # the two prompts really differ
    for out, ref, orig in zip(case["sparse"], case["ref"], case["original"]):
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, orig) > 1e-4  # the mask changed something: the op ran, not dense


def test_gradients_at_both_lengths(case):
    for grads, ref in zip(case["grads"], case["ref_grads"]):
        assert grads.keys() == ref.keys() and grads
        for n, g in grads.items():
            assert torch.isfinite(g).all(), n
            if ref[n].norm() > 1e-8:
                assert rel_err(g, ref[n]) < 1e-4, n


def test_plan_does_not_depend_on_text_length(tmp_path):
    """Calibrating on prompts of different lengths gives the same symbolic layouts; one plan (saved and
    loaded again) serves both."""
    model, kw = build_tiny("mochi")
    inputs = [with_valid_text("mochi", kw, n) for n in VALID]
    plans = []
    for calib in (inputs[1:], inputs):  # the short prompt alone, then both lengths
        vc.optimize(model, calib_inputs=calib, error_budget=1.0, progress=False, backend="eager")
        plans.append(vc.plan_of(model))
    layouts = [[(s.name, s.layout.to_dict() if s.layout else None) for s in p.sites] for p in plans]
    assert layouts[0] == layouts[1]
    assert plans[0].fingerprint == plans[1].fingerprint
    tiled = [s for s in plans[1].sites if s.tiled]
    assert tiled and all(s.layout.to_dict()["dynamic_text"] == "suffix" and "2 call" in s.reason for s in tiled)
    plans[1].save(tmp_path / "plan.json")
    vc.optimize(model, plan=str(tmp_path / "plan.json"), backend="eager")
    st = state_of(model)
    with torch.no_grad():
        outs = [out_of(model(**x)) for x in inputs]  # the loaded plan, applied at both lengths
    assert st.rewritten == {s.name for s in tiled} and all(torch.isfinite(o).all() for o in outs)
    assert [s.layout for s in st.site_list() if s.tileable] == [s.layout for s in tiled]
    vc.restore(model)


def test_calibrator_with_varying_text_equals_per_length_calibrators():
    """A dynamic-text calibrator fed two lengths accumulates what two fixed-layout calibrators would."""
    dyn = TokenLayout(3, 2, 2, 0, 0, dynamic_text="suffix")
    g = torch.Generator().manual_seed(0)
    calls = [tuple(torch.randn(1, 2, dyn.static_tokens + n, 8, generator=g) for _ in range(3)) for n in (5, 2)]
    cal = SiteCalibrator("s", dyn, 2)
    fixed = []
    for q, k, v in calls:
        cal.observe(q, k, v, 0.3)
        c = SiteCalibrator("s", dyn.resolve(q.shape[2]), 2, cal.candidates)
        c.observe(q, k, v, 0.3)
        fixed.append(c)
    assert torch.allclose(cal._err_sq, fixed[0]._err_sq + fixed[1]._err_sq)
    assert torch.allclose(cal._norm_sq, fixed[0]._norm_sq + fixed[1]._norm_sq)
    assert torch.allclose(cal._mass_sum, fixed[0]._mass_sum + fixed[1]._mass_sum)
    assert cal.density_layout() == dyn.resolve(dyn.static_tokens + 4)  # mean text length 3.5 -> 4
    with pytest.raises(ValueError, match="observed a sequence"):
        cal.observe(*(torch.randn(1, 2, dyn.static_tokens - 1, 8) for _ in range(3)))


def test_fixed_layout_calibrator_takes_calls_with_padding_cut_off():
    """HunyuanVideo 1.0 (fixed text[6]) under padding: the valid tokens only, a shorter suffix for that call."""
    lay = TokenLayout(3, 2, 2, 0, 6)
    q, k, v = (torch.randn(1, 2, lay.seq_len - 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    cal = SiteCalibrator("s", lay, 2)
    with pytest.raises(ValueError, match="observed a sequence"):
        cal.observe(q, k, v, 0.3)
    cal.observe(q, k, v, 0.3, padding_cut=True)
    short = SiteCalibrator("s", TokenLayout(3, 2, 2, 0, 2), 2, cal.candidates)
    short.observe(q, k, v, 0.3)
    assert torch.allclose(cal._err_sq, short._err_sq) and torch.allclose(cal._mass_sum, short._mass_sum)


@pytest.mark.parametrize("square", [False, True])
def test_tail_padding_matches_masked_dense(square):
    """(B,1,1,L) key padding (HunyuanVideo) and (B,1,L,L) valid x valid (HunyuanVideo 1.5), rows of different
    valid lengths: op on the valid tokens + dense padded rows == dense SDPA with tile mask & padding mask."""
    lay = TokenLayout(3, 2, 2, 2, 0, dynamic_text="suffix")  # 2 fixed prefix tokens, video, text of per-call length
    B, H, L, D = 2, 2, lay.static_tokens + 6, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.arange(L)[None] < torch.tensor([[L - 4], [L]])  # row 0: 4 padded text tokens, row 1: none
    mask = (valid[:, None, :, None] & valid[:, None, None, :]) if square else valid[:, None, None, :]
    assert valid_lengths(mask, B, L) == [L - 4, L]
    m = TileMask(1, 0)
    out = padded_tile_attention(q, k, v, lay, mask, [3, 2, 2, 2, 2], m.name, 0.4)
    fm = m.frame_mask(3)
    ref = dense_masked_attention(q, k, v, lay.resolve(L), fm, 0.4, attn_mask=mask)
    assert torch.allclose(out, ref, atol=1e-10)
    assert not torch.allclose(out, dense_masked_attention(q, k, v, lay.resolve(L), torch.ones(3, 3, dtype=torch.bool), 0.4,
                                                          attn_mask=mask))
    gq = torch.autograd.grad(out.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(gq, gr):
        assert torch.allclose(a, b, atol=1e-9)


def test_padding_the_op_cannot_serve_is_refused():
    lay = TokenLayout(3, 2, 2, 0, 0, dynamic_text="suffix")
    L = lay.static_tokens + 4
    q = torch.randn(1, 2, L, 8)
    hole = torch.ones(1, 1, 1, L, dtype=torch.bool)
    hole[..., -3] = False  # a padded token before a valid one
    video = torch.ones(1, 1, 1, L, dtype=torch.bool)
    video[..., lay.static_tokens - 1:] = False  # padding reaches into the video
    not_outer = torch.ones(1, 1, L, L, dtype=torch.bool)
    not_outer[..., 0, 1] = False
    for mask in (hole, video, not_outer, torch.zeros(1, 1, 1, L)):
        assert padded_tile_attention(q, q, q, lay, mask, [3, 2, 2, 2, 2], "g1w0", 0.3) is None


_INTERPRET_TWO_LENGTHS = """
import torch
from vdit_compile.kernels import tile_attention_triton as tat
from vdit_compile.ops.args import resolve
from vdit_compile.ops.reference import reference_tile_attention
g = torch.Generator().manual_seed(3)
plans = []
om = resolve(2, [4, 4, 4, 4, 4], "g1w0,dense")
for text in (8, 5, 8):  # per-call text lengths alternate: the visit-list cache must key on the length
    q, k, v = (torch.randn(1, 2, 21 + 4 * 16 + text, 16, generator=g) for _ in range(3))
    lay = om.unit_layout(q.shape[2], 21, text)
    out, lse = tat.forward(q, k, v, lay, om, 0.25)
    ro, rl = reference_tile_attention(q.double(), k.double(), v.double(), lay, om.unit_mask(), 0.25)
    torch.testing.assert_close(out.double(), ro, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), rl, rtol=2e-5, atol=2e-5)
    plans.append(tat._op_plan(q, lay, om))
assert plans[0] is plans[2] and plans[0] is not plans[1] and plans[1].qside.length == 21 + 64 + 5
print("ok")
"""


def test_triton_entry_with_per_call_text_length_under_interpreter():
    """The CUDA entry (Triton, here under TRITON_INTERPRET=1) gets the text length per call; its cached visit
    lists are keyed by the sequence layout, so alternating lengths never reuse another length's lists."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _INTERPRET_TWO_LENGTHS], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", f"{r.stdout}\n{r.stderr[-4000:]}"


def test_inductor_backend_serves_symbolic_graphs():
    """backend="inductor": graphs with a per-call text length run eagerly (inductor cannot lower Framepack's
    unbacked-length views); the result still equals the oracle at both lengths, in one graph."""
    model, kw = build_tiny("framepack")
    inputs = [with_valid_text("framepack", kw, n) for n in VALID]
    vc.optimize(model, plan=SPARSE, backend="inductor")
    with torch.no_grad():
        outs = [out_of(model(**x)) for x in inputs]
    st = state_of(model)
    sites, graphs = st.site_list(), st.graphs
    assert st.rewritten == {s.name for s in sites if s.tileable} and graphs == 1
    vc.restore(model)
    with torch.no_grad():
        for out, x in zip(outs, inputs):
            assert rel_err(out, reference_output("framepack", model, x, sites, SPARSE)) < 1e-5


@pytest.mark.parametrize("side", ["prefix", "suffix", "both"])
def test_hand_written_attention_with_trimmed_text(side):
    """A hand-written-attention DiT that keeps only the valid text tokens (boolean indexing): the text side of
    per-call length is read from the dataflow (prefix or suffix, probe-confirmed) and tiled at two lengths in
    one graph; trimmed text on both sides cannot be served and stays dense with a warning."""
    from core_models import ManualDiT

    _, kw = build_tiny("manual")
    model = ManualDiT(text_side=side).eval()
    inputs = [with_valid_text("manual", kw, n) for n in VALID]
    with torch.no_grad():
        originals = [out_of(model(**x)) for x in inputs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vc.optimize(model, plan=SPARSE, backend="eager")
        with torch.no_grad():
            outs = [out_of(model(**x)) for x in inputs]
    st = state_of(model)
    sites, graphs, notes = st.site_list(), st.graphs, [n for t in st.templates for n in t.notes]
    vc.restore(model)
    if side == "both":
        assert not any(s.tileable for s in sites) and all("both sides" in s.reason for s in sites), sites
        assert sum("left dense" in str(w.message) for w in caught) == 2
        for out, orig in zip(outs, originals):
            assert rel_err(out, orig) < 1e-5
        return
    assert [s.kind for s in sites] == [f"joint_text_{side}"] * 2 and graphs == 1
    assert all(s.layout.dynamic_text == side for s in sites) and notes.count("token order confirmed by probe") == 2
    with torch.no_grad():
        for out, orig, x in zip(outs, originals, inputs):
            assert rel_err(out, reference_output("manual", model, x, sites, SPARSE)) < 1e-5
            assert rel_err(out, orig) > 1e-4


@pytest.mark.parametrize("name", ["hunyuan", "hunyuan15"])
def test_calibration_under_padding_sees_only_valid_tokens(name, monkeypatch):
    """Calibrating on a padded prompt feeds the calibrator each row's valid tokens only (what the op attends
    to): fixed-length HunyuanVideo (padding mask, text[8]) and per-call-length HunyuanVideo 1.5."""
    seen = []
    observe = SiteCalibrator.observe

    def spy(self, q, k, v, scale=None, padding_cut=False, **kw):
        seen.append((self.name, q.shape[2], padding_cut))
        return observe(self, q, k, v, scale, padding_cut, **kw)

    monkeypatch.setattr(SiteCalibrator, "observe", spy)
    model, kw = build_tiny(name)
    padded = with_valid_text(name, kw, 5)
    vc.optimize(model, calib_inputs=[padded], error_budget=1.0, progress=False, backend="eager")
    plan = vc.plan_of(model)
    vc.restore(model)
    tiled = [s for s in plan.sites if s.layout is not None]
    assert len(tiled) == 2 and all("1 call" in s.reason for s in tiled if s.tiled)
    fixed = tiled[0].layout.text_prefix + tiled[0].layout.video_tokens
    extra = 4 + 8 if name == "hunyuan15" else 0  # HunyuanVideo 1.5 also joins 4 image + 8 byT5 tokens, all valid
    assert sorted(seen) == sorted((s.name, fixed + extra + 5, True) for s in tiled)


@pytest.mark.parametrize("name", ["mochi", "hunyuan15"])
def test_batch_rows_with_different_text_lengths(name):
    """Batch 2, rows with 8 and 5 valid tokens: Mochi trims per row (one site per row: ``attn1``, ``attn1#1``),
    HunyuanVideo 1.5 pads per row (the op on each row's valid tokens); both equal the oracle."""
    from core_models import batch_of_two

    model, kw = build_tiny(name)
    x = batch_of_two(name, kw, 5)
    vc.optimize(model, plan=SPARSE, backend="eager")
    with torch.no_grad():
        out = out_of(model(**x))
    st = state_of(model)
    sites = st.site_list()
    tiled = {s.name for s in sites if s.tileable}
    assert st.rewritten == tiled and len(tiled) == (4 if name == "mochi" else 2), tiled
    vc.restore(model)
    with torch.no_grad():
        ref, dense = reference_output(name, model, x, sites, SPARSE), out_of(model(**x))
    assert rel_err(out, ref) < 1e-5 and rel_err(out, dense) > 1e-4
