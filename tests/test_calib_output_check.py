"""The output check (OptimizeConfig.output_psnr): a calibrated plan is run again on the calibration samples and
heads go back to dense attention until the samples meet the PSNR target against dense ones."""
from __future__ import annotations

import math

import pytest
import torch

import vdit_compile as vc
from vdit_compile.calibration.output_check import (
    check_plan,
    give_back_order,
    min_psnr,
    output_tensor,
    psnr,
    with_dense_heads,
)
from vdit_compile.layout import TokenLayout
from vdit_compile.masks.base import parse_mask
from vdit_compile.plans import Plan
from vdit_compile.plans.plan import SitePlan, StepRange

LAY = TokenLayout(num_frames=4, height=2, width=2)


def _plan() -> Plan:
    """Two tiled sites and a dense one; errors and densities chosen so the order is known by hand."""
    g = parse_mask
    a = SitePlan("a", "video_self", LAY, 3, "tiled", "", [g("g0w0"), g("dense"), g("g1w0")],
                 [0.04, 0.0, 0.02], [0.25, 1.0, 0.5])
    b = SitePlan("b", "video_self", LAY, 2, "tiled", "", [g("g0w1"), g("g0w0")], [0.03, 0.05], [0.5, 0.25],
                 step_ranges=[StepRange(500.0, [g("g0w1"), g("g0w0")], [0.5, 0.25]),
                              StepRange(None, [g("g0w0"), g("dense")], [0.25, 1.0])])
    c = SitePlan("c", "video_self", LAY, 2, "dense", "every head needs dense attention", [g("dense")] * 2,
                 [0.0, 0.0], [1.0, 1.0])
    return Plan([a, b, c])


def test_psnr_is_the_usual_one_on_unit_range_frames_and_min_takes_the_worst_sample():
    ref = torch.zeros(2, 3, 4, 4)
    ref[0, 0, 0, 0] = 1.0  # range 1
    x = ref + 0.01
    assert psnr(x, ref) == pytest.approx(40.0, abs=1e-5)  # float32 input
    assert psnr(ref.clone(), ref) == math.inf
    worse = ref + 0.1
    assert min_psnr([x, worse], [ref, ref]) == pytest.approx(20.0, abs=1e-5)
    with pytest.raises(ValueError, match="expected a sample of shape"):
        psnr(x[:1], ref)
    with pytest.raises(ValueError, match="expected 2 sample"):
        min_psnr([x], [ref, ref])


def test_output_tensor_finds_the_sample_in_the_usual_output_forms():
    t = torch.randn(1, 2, 3)

    class Out:  # diffusers' BaseOutput has to_tuple()
        def to_tuple(self):
            return (t, None)

    for out in (t, (t, 1), [t], {"frames": t}, Out()):
        assert torch.equal(output_tensor(out), t)
    assert torch.equal(output_tensor([t, t]), torch.stack([t, t]))
    import numpy as np

    assert torch.equal(output_tensor(np.ones((2, 2), dtype=np.float32)), torch.ones(2, 2))
    with pytest.raises(TypeError, match="expected the output to hold a tensor"):
        output_tensor(object())


def test_give_back_order_ranks_squared_error_per_density_saved_and_skips_sites_left_dense():
    plan = _plan()
    # a/0: .04^2/.75 = 2.13e-3; a/2: .02^2/.5 = 8e-4; b/0: .03^2/.5 = 1.8e-3; b/1: .05^2/.75 = 3.33e-3
    assert give_back_order(plan) == [("b", 1), ("a", 0), ("b", 0), ("a", 2)]
    assert give_back_order(plan, rewritten={"a"}) == [("a", 0), ("a", 2)]
    assert give_back_order(plan, rewritten=set()) == []


def test_with_dense_heads_copies_the_plan_and_makes_the_heads_dense_in_every_step_range():
    plan = _plan()
    out = with_dense_heads(plan, [("b", 0), ("a", 2)])
    assert [m.name for m in plan.site("a").masks] == ["g0w0", "dense", "g1w0"]  # the original is untouched
    assert [m.name for m in out.site("a").masks] == ["g0w0", "dense", "dense"]
    assert out.site("a").densities == [0.25, 1.0, 1.0] and out.site("a").tiled
    assert [m.name for m in out.site("b").masks] == ["dense", "g0w0"]
    assert [[m.name for m in r.masks] for r in out.site("b").step_ranges] == [["dense", "g0w0"], ["dense", "dense"]]
    assert any("output check" in n for n in out.site("b").notes)
    gone = with_dense_heads(plan, [("b", 0), ("b", 1)])
    assert not gone.site("b").tiled and gone.site("b").step_ranges is None and gone.site("b").tile is None
    assert Plan.from_dict(gone.to_dict()).site("b").status == "dense"  # still a valid plan
    with pytest.raises(KeyError, match="not in the plan"):
        with_dense_heads(plan, [("zz", 0)])


def _fake_trial(plan_in: Plan, noise: dict, ref: torch.Tensor, calls: list):
    """Samples = ref + a fixed random pattern per sparse head, scaled by that head's noise level: giving a head
    back removes its term, so PSNR rises monotonically as heads go back."""
    g = torch.Generator().manual_seed(1)
    pattern = {k: torch.randn(ref.shape, generator=g) for k in sorted(noise)}

    def trial(plan):
        calls.append(plan)
        x = ref.clone()
        for (name, h), level in noise.items():
            if not plan.site(name).masks[h].dense:
                x += level * pattern[(name, h)]
        return [x], None

    return trial


@pytest.mark.parametrize("target", [10.0, 25.0, 31.0, 38.0, 60.0])
def test_check_plan_gives_back_the_shortest_prefix_of_the_order_that_meets_the_target(target):
    plan = _plan()
    ref = torch.rand(1, 3, 8, 8)
    noise = {("a", 0): 0.02, ("a", 2): 0.005, ("b", 0): 0.01, ("b", 1): 0.03}
    calls: list = []
    out, res = check_plan(plan, _fake_trial(plan, noise, ref, calls), [ref], target, max_trials=8)
    order = give_back_order(plan)
    # brute force, independent of the bisection: PSNR of every prefix, computed directly
    sparse = _fake_trial(plan, noise, ref, [])
    prefix_psnr = [min_psnr(sparse(with_dense_heads(plan, order[:k]))[0], [ref]) for k in range(len(order))]
    want = next((k for k, p in enumerate(prefix_psnr) if p >= target), len(order))
    assert res.given_back == [f"{n}/{h}" for n, h in order[:want]]
    assert res.met and res.target_psnr == target
    assert len(calls) == len(res.trials) <= 1 + math.ceil(math.log2(len(order)))
    if want == 0:
        assert out is plan and res.psnr == pytest.approx(prefix_psnr[0])
    elif want == len(order):
        assert res.psnr == math.inf and not out.site("a").tiled and not out.site("b").tiled
    else:
        assert res.psnr == pytest.approx(prefix_psnr[want]) and res.psnr >= target
    dense_now = {(s.name, h) for s in out.sites for h, m in enumerate(s.masks) if m.dense and s.name != "c"}
    assert dense_now == {("a", 1)} | set(order[:want])
    assert res.to_dict()["given_back"] == res.given_back


def test_check_plan_stops_at_max_trials_with_a_plan_a_trial_showed_to_meet_the_target_or_all_dense():
    plan = _plan()
    ref = torch.rand(1, 3, 8, 8)
    noise = {("a", 0): 0.02, ("a", 2): 0.005, ("b", 0): 0.01, ("b", 1): 0.03}
    calls: list = []
    out, res = check_plan(plan, _fake_trial(plan, noise, ref, calls), [ref], 38.0, max_trials=1)
    assert len(calls) == 1 and res.given_back == [f"{n}/{h}" for n, h in give_back_order(plan)]
    assert res.psnr == math.inf and not any(s.tiled for s in out.sites)
    with pytest.raises(ValueError, match="output_psnr must be a positive number"):
        check_plan(plan, _fake_trial(plan, noise, ref, []), [ref], float("nan"))


def test_optimize_with_output_psnr_meets_it_on_the_calibration_prompt_measured_independently():
    from tests.calib_helpers import tiny_pipeline

    pipe = tiny_pipeline()
    prompt, kw = "a blue square bouncing", dict(calib_steps=2, error_budget=0.5, progress=False, cost_model="always")

    def run():
        with torch.no_grad():
            return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames

    dense = run()
    vc.optimize(pipe, calib_prompts=[prompt], **kw)
    loose_plan = vc.plan_of(pipe)
    loose = psnr(run(), dense)
    vc.restore(pipe)
    assert loose_plan.tiled_sites() and math.isfinite(loose)  # the loose budget's plan errs
    target = loose + 3.0
    vc.optimize(pipe, calib_prompts=[prompt], output_psnr=target, **kw)
    plan = vc.plan_of(pipe)
    check = plan.calibration["output_check"]
    assert check["met"] and check["given_back"] and check["trials"][0][0] == 0
    assert check["trials"][0][1] == pytest.approx(loose, abs=0.05)  # the check's first trial is the plan as it was
    assert check["sparse_sites"] == sorted(s.name for s in loose_plan.tiled_sites())  # cost_model="always": all
    got = psnr(run(), dense)  # the optimised pipeline on its own, against dense, outside the check
    assert got >= target - 0.05
    assert check["psnr"] == "inf" or got == pytest.approx(check["psnr"], abs=0.05)
    assert sum(m.dense for s in plan.sites for m in s.masks) > sum(m.dense for s in loose_plan.sites for m in s.masks)
    vc.restore(pipe)
    vc.optimize(pipe, calib_prompts=[prompt], output_psnr=max(loose - 3.0, 1.0), **kw)  # met as it is: unchanged
    same = vc.plan_of(pipe)
    assert same.calibration["output_check"]["given_back"] == []
    assert [[m.name for m in s.masks] for s in same.sites] == [[m.name for m in s.masks] for s in loose_plan.sites]
    vc.restore(pipe)


def test_optimize_with_output_psnr_on_a_bare_transformer_checks_its_calibration_calls():
    from tests.calib_helpers import tiny_wan, wan_inputs

    model, _ = tiny_wan()
    inputs = [wan_inputs(seed=s) for s in (1, 2)]
    with torch.no_grad():
        dense = [model(**i)[0] for i in inputs]
    kw = dict(error_budget=0.6, progress=False, cost_model="always")
    vc.optimize(model, calib_inputs=inputs, **kw)
    with torch.no_grad():
        loose = min_psnr([model(**i)[0] for i in inputs], dense)
    vc.restore(model)
    vc.optimize(model, calib_inputs=inputs, output_psnr=loose + 2.0, **kw)
    with torch.no_grad():
        got = min_psnr([model(**i)[0] for i in inputs], dense)
    assert vc.plan_of(model).calibration["output_check"]["met"] and got >= loose + 2.0 - 0.05
    vc.restore(model)


@pytest.mark.parametrize("bad, match", [(0, "output_psnr must be > 0"), ("30", "must be a number"),
                                        (float("inf"), "must be finite")])
def test_output_psnr_refuses_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vc.OptimizeConfig(output_psnr=bad)
    with pytest.raises(ValueError, match="output_check_trials must be >= 1"):
        vc.OptimizeConfig(output_check_trials=0)


def test_prefix_order_is_a_permutation_of_every_sparse_head():
    plan = _plan()
    order = give_back_order(plan)
    sparse = {(s.name, h) for s in plan.sites if s.tiled for h, m in enumerate(s.masks)
              if not m.dense or any(not r.masks[h].dense for r in s.step_ranges or [])}
    assert sorted(order) == sorted(sparse) and len(set(order)) == len(order)


def test_check_output_on_a_saved_plan_and_the_calibrate_cli(tmp_path, capsys):
    """A plan written by `vdit-compile calibrate` gets the same check: through the API on the plan file, and through
    `calibrate --output-psnr`; the checked plan, applied on its own, meets the target on the calibration prompt."""
    from pathlib import Path

    from tests.calib_helpers import tiny_pipeline
    from vdit_compile.cli.main import main as cli

    helpers = str(Path(__file__).with_name("calib_helpers.py"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square bouncing\n")
    loose = tmp_path / "loose.json"
    assert cli(["calibrate", f"{helpers}:tiny_pipeline", "--prompts", str(prompts), "-o", str(loose), "--steps", "2",
                "--budget", "0.5", "--seed", "3"]) == 0
    pipe = tiny_pipeline()

    def run(plan=None):
        if plan is not None:
            vc.optimize(pipe, plan=plan, progress=False, cost_model="always")
        try:
            with torch.no_grad():
                return pipe("a blue square bouncing", num_inference_steps=2,
                            generator=torch.Generator().manual_seed(3)).frames
        finally:
            vc.restore(pipe)

    dense, before = run(), psnr(run(str(loose)), run())
    assert math.isfinite(before)
    target = before + 3.0
    checked = vc.check_output(pipe, str(loose), target, calib_prompts=["a blue square bouncing"], calib_steps=2,
                              calib_seed=3, cost_model="always", progress=False)
    assert checked.calibration["output_check"]["given_back"] and vc.plan_of(pipe) is None  # the model is untouched
    assert psnr(run(checked), dense) >= target - 0.05
    out = tmp_path / "checked.json"
    capsys.readouterr()
    assert cli(["calibrate", f"{helpers}:tiny_pipeline", "--prompts", str(prompts), "-o", str(out), "--steps", "2",
                "--budget", "0.5", "--seed", "3", "--output-psnr", f"{target}"]) == 0
    from_cli = Plan.load(out)
    from vdit_compile.plans.show import format_table

    shown = format_table(from_cli)  # `vdit-compile plan show` and the calibrate CLI print the check's trials
    assert f"target {target:g} dB" in shown and "given back to dense (" in shown
    assert from_cli.calibration["output_check"]["given_back"] == checked.calibration["output_check"]["given_back"]
    assert psnr(run(from_cli), dense) >= target - 0.05
    assert cli(["calibrate", f"{helpers}:tiny_pipeline", "--prompts", str(prompts), "-o", str(out),
                "--output-psnr", "-3"]) == 1
    assert "--output-psnr must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs calib_prompts"):
        vc.check_output(pipe, checked, 30.0)


def test_output_check_on_a_step_aware_plan_gives_heads_back_in_every_range():
    """Step-aware plans: a head given back attends densely in every step range, and the checked plan, applied on its
    own (one compiled graph per range), meets the target against dense.  The plan's ranges are made by hand from a
    calibrated plan (late steps: the sparsest frame tile), so the test does not depend on calibration splitting."""
    import copy

    from tests.calib_helpers import tiny_pipeline

    pipe = tiny_pipeline()
    prompt, opts = "a blue square bouncing", dict(progress=False, cost_model="always")

    def run(plan=None):
        if plan is not None:
            vc.optimize(pipe, plan=plan, **opts)
        try:
            with torch.no_grad():
                return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames
        finally:
            vc.restore(pipe)

    vc.optimize(pipe, calib_prompts=[prompt], calib_steps=3, error_budget=0.5, **opts)
    plan = copy.deepcopy(vc.plan_of(pipe))
    vc.restore(pipe)
    for sp in plan.tiled_sites():
        late = [parse_mask("g0w0")] * sp.num_heads
        sp.step_ranges = [StepRange(500.0, list(sp.masks), list(sp.densities)), StepRange(None, late, [0.1] * sp.num_heads)]
    assert plan.step_aware
    dense = run()
    loose = psnr(run(plan), dense)
    assert math.isfinite(loose)
    before = plan.to_dict()
    checked = vc.check_output(pipe, plan, loose + 3.0, calib_prompts=[prompt], calib_steps=3, **opts)
    assert plan.to_dict() == before and checked is not plan  # the caller's plan is left as it was
    back = checked.calibration["output_check"]["given_back"]
    assert back and psnr(run(checked), dense) >= loose + 3.0 - 0.05
    for item in back:
        name, h = item.rsplit("/", 1)
        sp = checked.site(name)
        assert sp.masks[int(h)].dense and all(r.masks[int(h)].dense for r in sp.step_ranges or [])
