"""Step caching composed with optimize(): the policy's arithmetic against closed forms, the evaluation
counts, FBC through the compiled forward against diffusers' FBC on the eager model, undo."""
import pytest
import torch

import vdit_compile as vc
from vdit_compile import OptimizeConfig, TileMask
from vdit_compile.wholestep import report_of, reset_cache
from vdit_compile.wholestep.caching import StepCache


class Poly(torch.nn.Module):
    """Output = a polynomial of the step index (timestep 1000 - 10 * step), so forecasts can be checked."""

    def __init__(self, coeffs):
        super().__init__()
        self.coeffs = coeffs
        self.calls = 0

    def forward(self, hidden_states, timestep, return_dict=False):
        self.calls += 1
        s = (1000 - timestep.float()[0]) / 10
        val = sum(c * s ** i for i, c in enumerate(self.coeffs))
        return (hidden_states * 0 + val,)


def _trajectory(model, steps, streams=1):
    x = torch.zeros(2, 3)
    outs = []
    for i in range(steps):
        t = torch.tensor([1000.0 - 10 * i])
        outs.append([model(hidden_states=x, timestep=t)[0][0, 0].item() for _ in range(streams)])
    return outs


@pytest.mark.parametrize("order,coeffs", [(1, [3.0, -2.0]), (2, [1.0, 0.5, -0.25])])
def test_taylorseer_forecast_is_exact_on_polynomials_of_its_order(order, coeffs):
    model = Poly(coeffs)
    cache = StepCache(model, "taylorseer", threshold=3, warmup=2, order=order)
    cache.attach()
    outs = _trajectory(model, 14)
    truth = [sum(c * s ** i for i, c in enumerate(coeffs)) for s in range(14)]
    # evaluated: steps 0, 1 (warm-up), then 2, 5, 8, 11 (every third); forecasts use the last order + 1 of them
    assert model.calls == 6
    start = 2 if order == 1 else 3
    for s in range(start, 14):
        assert outs[s][0] == pytest.approx(truth[s], rel=1e-5, abs=1e-4), s
    stats = cache.stats.as_dict()
    assert stats["calls"] == 14 and stats["evaluations"] == 6


def test_new_sample_resets_and_streams_are_separate():
    model = Poly([0.0, 1.0])
    cache = StepCache(model, "taylorseer", threshold=2, warmup=1, order=1)
    cache.attach()
    two = _trajectory(model, 6, streams=2)  # cond + uncond as separate calls with the same timestep
    assert [a == b for a, b in two] == [True] * 6
    _trajectory(model, 6)  # timestep goes back up: a new sample
    samples = cache.stats.as_dict()["samples"]
    assert [s["calls"] for s in samples] == [12, 6]
    # warm-up 1 then every 2nd step: steps 0, 1, 3, 5 evaluated -> 4 per stream
    assert [s["evaluations"] for s in samples] == [8, 4]


def _tiny():
    from vdit_compile.models.embedded import load_pipeline

    return load_pipeline(weights=None, tiny=True)


def _sample(pipe, steps):
    g = torch.Generator().manual_seed(3)
    return pipe("a small red circle moving left over a dark blue background", num_inference_steps=steps, generator=g,
                progress=False, num_frames=4).frames


def test_taylorseer_on_optimized_pipeline_counts_and_restores():
    pipe = _tiny()
    vc.optimize(pipe, plan=TileMask(1, 0), progress=False)
    tiled = _sample(pipe, 4)
    vc.optimize(pipe, plan=TileMask(1, 0), progress=False, cache="taylorseer", cache_warmup=4)
    assert torch.equal(_sample(pipe, 4), tiled)  # all four steps in the warm-up: nothing forecast
    assert report_of(pipe)["cache"]["evaluations"] == 4
    vc.optimize(pipe, plan=TileMask(1, 0), progress=False, cache="taylorseer", cache_warmup=2)
    cached = _sample(pipe, 4)
    rep = report_of(pipe)["cache"]
    assert rep["policy"] == "taylorseer" and rep["samples"] == [{"calls": 4, "evaluations": 3}]  # 0, 1, 2
    assert not torch.equal(cached, tiled)
    assert (cached - tiled).abs().max() < 0.5
    assert {"blocks.0.attn1", "blocks.1.attn1"} <= vc.api.state_of(pipe.transformer).rewritten
    reset_cache(pipe)
    assert report_of(pipe)["cache"]["calls"] == 0
    vc.restore(pipe)
    assert "forward" not in pipe.transformer.__dict__ and report_of(pipe) is None


def test_fbc_through_compiled_forward_matches_diffusers_fbc_on_the_eager_model():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = _tiny()
    tr = pipe.transformer
    vc.optimize(pipe, plan=TileMask(dense=True), progress=False, cache="fbc", cache_threshold=0.3)
    ours = _sample(pipe, 6)
    rep = report_of(pipe)["cache"]
    vc.restore(pipe)
    assert not any(getattr(b, "_diffusers_hook", None) and b._diffusers_hook.hooks for b in tr.blocks)

    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=0.3))  # diffusers alone, no compile
    head = tr.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    computed = []
    orig = head._should_compute_remaining_blocks

    def spy(res):
        computed.append(orig(res))
        return computed[-1]

    head._should_compute_remaining_blocks = spy
    with tr.cache_context("ref"):
        ref = _sample(pipe, 6)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert rep["samples"] == [{"calls": 6, "evaluations": sum(computed)}]
    assert 1 <= rep["evaluations"] < 6


def test_cache_config_errors():
    with pytest.raises(ValueError, match="cache must be None or one of"):
        OptimizeConfig(cache="teacache")
    with pytest.raises(ValueError, match="interval, an integer >= 2"):
        OptimizeConfig(cache="taylorseer", cache_threshold=1.5)
    with pytest.raises(ValueError, match="cache_warmup must be >= 1"):
        OptimizeConfig(cache="fbc", cache_warmup=0)
