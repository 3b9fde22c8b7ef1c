"""Coverage of the diffusers video transformers (issue 3, part 8), on CPU with tiny random configs.

Per model: (a) the sites found and their kinds/layouts match ``core_models.EXPECTED``;
(b) with an all-dense plan every tileable site runs through ``vdit::tile_attention`` and the
output equals the original (fp32, rel. error < 1e-5); (c) with a sparse plan the output equals
the original model run with an independent implementation, dense SDPA with the equivalent
boolean mask (``dense_masked_attention``) swapped in at the same sites by a torch function mode;
(d) gradients through the rewritten model equal those of that reference.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from core_models import EXPECTED, NAMES, build_tiny
from core_models import out_of as _out
from core_models import reference_output as _reference
from core_models import rel_err as _rel

import vdit_compile as vc
from vdit_compile import TileMask
from vdit_compile.capture import state_of

SPARSE = TileMask(1, 0)


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    model, kwargs = build_tiny(name)
    with torch.no_grad():
        original = _out(model(**kwargs))
    res = {"name": name, "original": original}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vc.optimize(model, plan=TileMask(dense=True), backend="eager")
        with torch.no_grad():
            res["dense"] = _out(model(**kwargs))
    res["warnings"] = [str(w.message) for w in caught]
    st = state_of(model)
    res["sites"], res["rewritten_dense"] = st.site_list(), set(st.rewritten)
    expect = EXPECTED[name]
    if expect.tiled:
        vc.optimize(model, plan=SPARSE, backend="eager")
        model.zero_grad()
        out = _out(model(**kwargs))
        out.square().mean().backward()
        res["sparse"] = out.detach()
        res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res["rewritten_sparse"] = set(state_of(model).rewritten)
        vc.restore(model)
        model.zero_grad()
        ref = _reference(name, model, kwargs, res["sites"], SPARSE)
        ref.square().mean().backward()
        res["ref"] = ref.detach()
        res["ref_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    vc.restore(model)
    return res


def test_sites_and_kinds(case):
    expect = EXPECTED[case["name"]]
    sites = case["sites"]
    tiled = [s for s in sites if s.tileable]
    assert len(tiled) == expect.tiled, [s.describe() for s in sites]
    for s in tiled:
        lay = s.layout
        assert s.kind == expect.kind, s.describe()
        assert (lay.num_frames, lay.height, lay.width, lay.text_prefix, lay.text_suffix) == expect.layout, s.describe()
        assert lay.dynamic_text == expect.dynamic, s.describe()
        assert s.num_heads == 2 and s.head_dim == 16
    dense3d = [s for s in sites if not s.tileable and expect.reason and expect.reason in s.reason]
    assert len(dense3d) == expect.dense3d, [s.describe() for s in sites]
    for s in dense3d:  # left dense with a warning, never silently
        assert any(s.name in w for w in case["warnings"]), case["warnings"]
    kinds = {s.kind for s in sites}
    assert set(expect.kinds) <= kinds, kinds
    assert len({s.name for s in sites}) == len(sites)


def test_dense_plan_equals_original(case):
    assert case["name"] in EXPECTED
    tiled = {s.name for s in case["sites"] if s.tileable}
    assert case["rewritten_dense"] == tiled  # every tileable site goes through the op
    assert _rel(case["dense"], case["original"]) < 1e-5


def test_sparse_plan_equals_masked_dense(case):
    if not EXPECTED[case["name"]].tiled:
        pytest.skip("no tileable site: the model is left dense (checked in test_sites_and_kinds)")
    assert case["rewritten_sparse"] == {s.name for s in case["sites"] if s.tileable}
    assert _rel(case["sparse"], case["ref"]) < 1e-5
    assert _rel(case["sparse"], case["original"]) > 1e-4  # the mask really changed something


def test_gradients_flow(case):
    if not EXPECTED[case["name"]].tiled:
        pytest.skip("no tileable site")
    grads, ref = case["grads"], case["ref_grads"]
    assert grads.keys() == ref.keys() and grads
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        if ref[n].norm() > 1e-8:
            assert _rel(g, ref[n]) < 1e-4, n
