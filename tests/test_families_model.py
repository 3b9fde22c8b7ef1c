"""Mask families and step-aware plans on a whole model: the rewritten model against its masked-dense oracle.

The oracle replaces each tileable site's SDPA with dense SDPA under the family's element mask
(``MaskSpec.element_mask`` on token coordinates), independent of the op's tiles, reorder and unit masks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_models import build_tiny, out_of, rel_err
from torch.overrides import TorchFunctionMode

import vdit_compile as vc
from vdit_compile import SpatialWindow, TileMask, Window3D
from vdit_compile.capture import state_of
from vdit_compile.plans import Plan, StepRange


class ElementMaskedSDPA(TorchFunctionMode):
    """An SDPA call inside a tileable site's module becomes dense SDPA under ``masks_of(site)``'s element masks.

    The site of a call is the innermost site module running at that moment (forward hooks), not the i-th entry of
    the discovered site list: Dynamo may reuse graphs it holds for the model class from earlier tests, so the
    discovery order need not be the call order."""

    def __init__(self, model, sites, masks_of):
        super().__init__()
        self.masks_of, self.running = masks_of, []
        modules = dict(model.named_modules())
        self.hooks = []
        for site in sites:
            mod = modules[site.name]
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, s=site: self.running.append(s)))
            self.hooks.append(mod.register_forward_hook(self._leave))

    def _leave(self, module, args, output):  # returns None: the module's output is left as it is
        self.running.pop()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from vdit_compile.passes.attention import _SDPA_SIG

        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            assert self.running, "an SDPA call outside every site module"
            site = self.running[-1]
            found = self.masks_of(site) if site.tileable else None
            if found is not None:
                masks, grid = found
                a = _SDPA_SIG.bind(*args, **kwargs).arguments
                q, k, v = a["query"], a["key"], a["value"]
                em = torch.stack([m.element_mask(site.layout, grid) for m in masks])[None]
                return func(q, k, v, attn_mask=em, scale=a.get("scale") or q.shape[-1] ** -0.5)
        return func(*args, **kwargs)


def _oracle(model, kw, sites, plan, step_range=None):
    def masks_of(site):
        sp = plan.site(site.name)
        if sp is None or not sp.tiled:
            return None
        return sp.masks_for(site.layout, step_range), sp.unit_grid(site.layout)

    with ElementMaskedSDPA(model, sites, masks_of), torch.no_grad():
        return out_of(model(**kw))


@pytest.fixture(scope="module")
def wan():
    model, kw = build_tiny("wan")
    sites = vc.inspect_model(model, kw)
    assert any(s.tileable for s in sites)
    return model, kw, sites


@pytest.mark.parametrize("mask", [Window3D(0, 0, 1), SpatialWindow(0, 0, g=1), Window3D(1, 0, 0)])
def test_uniform_window_family_matches_its_oracle(wan, mask):
    model, kw, sites = wan
    plan = Plan.uniform(sites, mask, tile_tokens=4)
    tiled = plan.tiled_sites()
    assert tiled and all(sp.tile is not None and sp.tile != (sp.layout.height, sp.layout.width) for sp in tiled)
    assert all(sp.density < 1 for sp in tiled)
    ref = _oracle(model, kw, sites, plan)
    dense = _oracle(model, kw, sites, Plan.uniform(sites, TileMask(dense=True)))
    vc.optimize(model, plan=plan, cost_model="always")  # every tiled site rewritten, whatever the CPU timings
    try:
        with torch.no_grad():
            out = out_of(model(**kw))
        assert state_of(model).rewritten == {sp.name for sp in tiled}
    finally:
        vc.restore(model)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, dense) > 1e-4  # the mask mattered


def test_per_head_mixed_families_and_plan_round_trip(wan, tmp_path):
    model, kw, sites = wan
    plan = Plan.uniform(sites, Window3D(0, 0, 0), tile_tokens=4)
    for sp in plan.tiled_sites():
        sp.masks = [SpatialWindow(0, 0), TileMask(1, 0)][: sp.num_heads]
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert [sp.masks for sp in loaded.tiled_sites()] == [sp.masks for sp in plan.tiled_sites()]
    assert [sp.tile for sp in loaded.tiled_sites()] == [sp.tile for sp in plan.tiled_sites()]
    ref = _oracle(model, kw, sites, loaded)
    vc.optimize(model, plan=path, cost_model="always")
    try:
        with torch.no_grad():
            out = out_of(model(**kw))
    finally:
        vc.restore(model)
    assert rel_err(out, ref) < 1e-5


def test_step_aware_plan_switches_masks_at_the_right_steps(wan):
    model, kw, sites = wan
    plan = Plan.uniform(sites, TileMask(1, 0), tile_tokens=4)
    for sp in plan.tiled_sites():
        sp.step_ranges = [StepRange(600.0, [TileMask(1, 0)] * sp.num_heads),
                          StepRange(None, [Window3D(0, 0, 0)] * sp.num_heads)]
        sp.tile = (2, 2)
    assert plan.step_aware and plan.step_range_of(900) == 0 and plan.step_range_of(100) == 1
    early, late = dict(kw, timestep=torch.tensor([900])), dict(kw, timestep=torch.tensor([100]))
    ref_early, ref_late = _oracle(model, early, sites, plan, 0), _oracle(model, late, sites, plan, 1)
    assert rel_err(ref_early, ref_late) > 1e-3  # the two ranges' masks give different outputs
    vc.optimize(model, plan=plan, cost_model="always")  # every tiled site rewritten, whatever the CPU timings
    try:
        st = state_of(model)
        with torch.no_grad():
            a = out_of(model(**early))
            graphs_after_first = st.graphs
            b = out_of(model(**late))
            c = out_of(model(**early))
            d = out_of(model(**late))
        assert st.graphs <= 2 * graphs_after_first  # one compilation per range, none when a range comes back
    finally:
        vc.restore(model)
    assert rel_err(a, ref_early) < 1e-5 and rel_err(c, ref_early) < 1e-5
    # the late range recomputes with another timestep embedding too: compare with its own oracle
    assert rel_err(b, ref_late) < 1e-5 and rel_err(d, ref_late) < 1e-5


def test_step_ranges_survive_save_and_bad_entries_are_refused(wan, tmp_path):
    from vdit_compile.plans import PlanError

    _, _, sites = wan
    plan = Plan.uniform(sites, TileMask(1, 0))
    sp = plan.tiled_sites()[0]
    sp.step_ranges = [StepRange(500.0, [TileMask(1, 0)]), StepRange(None, [TileMask(0, 0)])]
    loaded = Plan.load(plan.save(tmp_path / "p.json"))
    lsp = loaded.site(sp.name)
    assert [r.min_timestep for r in lsp.step_ranges] == [500.0, None]
    assert lsp.masks_for(sp.layout, 1) == [TileMask(0, 0)] * sp.num_heads
    d = plan.to_dict()
    d["sites"][[s["name"] for s in d["sites"]].index(sp.name)]["tile"] = [3, 3]
    import json

    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="tile \\[3, 3\\] does not fit"):
        Plan.load(tmp_path / "bad.json")
