"""FP8 linears: e4m3 rounding against a brute-force table, the choice of linears (role, sizes, error
check, user globs), the device checks, the emulated path through optimize() and its undo; on an sm89+
GPU with torchao, the real path against the emulated numerics."""

import pytest
import torch

import vdit_compile as vc
from vdit_compile import OptimizeConfig, TileMask
from vdit_compile.wholestep import report_of
from vdit_compile.wholestep.fp8 import (
    FP8_MAX,
    Fp8UnsupportedError,
    choose_linears,
    fp8_error,
    quantize_rows,
    torchao_status,
)


def _e4m3_table() -> torch.Tensor:
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(vals[torch.isfinite(vals)])


def test_row_quantization_matches_brute_force_nearest_e4m3():
    table = _e4m3_table()
    x = torch.randn(7, 33, dtype=torch.float64) * torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None]
    scale = FP8_MAX / x.abs().amax(dim=1, keepdim=True)
    y = (x * scale).float()
    # nearest representable value; ties (measure zero for random data) are not exercised
    idx = (y[..., None] - table).abs().argmin(dim=-1)
    ref = table[idx].double() / scale
    got = quantize_rows(x).double()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert (got - x).abs().max() > 0  # it does quantise


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embedding = torch.nn.Linear(32, 64)
        self.block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 48), torch.nn.Linear(48, 24))
        self.outlier = torch.nn.Linear(64, 64)
        self.proj_out = torch.nn.Linear(64, 32)
        self.attn2 = torch.nn.Module()
        self.attn2.to_q, self.attn2.to_k = torch.nn.Linear(64, 64), torch.nn.Linear(32, 64)


def test_choice_keeps_by_role_size_error_and_user_glob():
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.outlier.weight[:, 0] = 0  # a channel the output ignores, whose outliers set every row's scale
    x = torch.randn(128, 64)
    x[:, 0] = 1e6  # e4m3 keeps ~2^-9 of a row's max: the other channels fall to zero
    acts = {"outlier": x}
    c = choose_linears(m, "emulate", keep=["block.0"], max_error=0.05, activations=acts)
    assert c.quantized == ["block.1", "attn2.to_q"]  # cross-attention queries read the video tokens: FP8
    assert "condition tokens" in c.kept["attn2.to_k"]  # its keys read the text only: too few rows to gain
    assert "by role" in c.kept["patch_embedding"] and "by role" in c.kept["proj_out"]
    assert "matches 'block.0'" in c.kept["block.0"]
    assert "multiples of 16" in c.kept["block.2"]
    assert "error check" in c.kept["outlier"] and c.errors["outlier"] > 0.05
    # the same weights with ordinary activations pass the check
    assert fp8_error(torch.randn(128, 64), m.outlier.weight) < 0.05


def test_fp8_on_refuses_cpu_clearly_and_auto_falls_back_with_a_warning():
    from vdit_compile.models.embedded import load_pipeline

    pipe = load_pipeline(weights=None, tiny=True)
    with pytest.raises(Fp8UnsupportedError, match="sm89"):
        vc.optimize(pipe, plan=TileMask(1, 0), progress=False, fp8=True)
    assert "forward" not in pipe.transformer.__dict__  # nothing left behind
    with pytest.warns(UserWarning, match="fp8='auto'"):
        vc.optimize(pipe, plan=TileMask(1, 0), progress=False, fp8="auto")
    rep = report_of(pipe)["fp8"]
    assert rep["mode"] == "off" and "sm89" in rep["note"]
    vc.restore(pipe)
    with pytest.raises(ValueError, match="fp8 must be"):
        OptimizeConfig(fp8="fp4")


def test_emulated_fp8_through_optimize_matches_manual_numerics_and_restores():
    from vdit_compile.models.embedded import load_pipeline
    from vdit_compile.wholestep.fp8 import emulated_linear

    pipe = load_pipeline(weights=None, tiny=True)
    tr = pipe.transformer
    torch.manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 3, 4, 16, 16), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 8, tr.config.text_dim), return_dict=False)
    with torch.no_grad():
        ref = tr(**kw)[0]
        vc.optimize(tr, plan=TileMask(dense=True), calib_inputs=[kw], progress=False, fp8="emulate")
        rep = report_of(tr)["fp8"]
        out = tr(**kw)[0]
    assert rep["activations"] == "recorded"
    assert "blocks.0.ffn.net.0.proj" in rep["quantized"] and "proj_out" in rep["kept"]
    assert not any(n.startswith("condition_embedder") for n in rep["quantized"])
    # independent reference: the eager model with the chosen linears' forward replaced by hand
    vc.restore(tr)
    handles = [tr.get_submodule(n).register_forward_hook(
        lambda mod, args, _o: emulated_linear(args[0], mod.weight, mod.bias)) for n in rep["quantized"]]
    with torch.no_grad():
        manual = tr(**kw)[0]
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-4)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.1
    with torch.no_grad():
        assert torch.equal(tr(**kw)[0], ref)  # restored: plain linears again


def _fp8_gpu_ready():
    if not torch.cuda.is_available():
        return "no CUDA"
    if torch.cuda.get_device_capability() < (8, 9):
        return "GPU below sm89"
    ok, why = torchao_status()
    return None if ok else why


def test_fp8_on_leaves_inductor_config_alone(monkeypatch):
    """torchao's configs default to ``set_inductor_config=True``, which switches on inductor's coordinate-descent
    tuning for the whole process (minutes of compile per model, never undone); the swap must ask for False.
    torchao is replaced by a recorder here (its FP8 path needs an sm89+ GPU; the GPU test below runs the real one)."""
    import sys
    import types
    from dataclasses import dataclass

    from vdit_compile.wholestep.fp8 import Fp8Choice, Fp8Linears

    seen = {}

    @dataclass
    class Config:
        granularity: object = None
        set_inductor_config: bool = True

    def quantize_(module, config, filter_fn=None):
        seen["config"] = config
        seen["names"] = [n for n, m in module.named_modules() if filter_fn(m, n)]

    fake = types.ModuleType("torchao.quantization")
    fake.Float8DynamicActivationFloat8WeightConfig, fake.PerRow, fake.quantize_ = Config, lambda: "per-row", quantize_
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    Fp8Linears(model, Fp8Choice("on", quantized=["1"])).apply()
    assert seen["config"].set_inductor_config is False and seen["config"].granularity == "per-row"
    assert seen["names"] == ["1"]


@pytest.mark.gpu
@pytest.mark.skipif(_fp8_gpu_ready() is not None, reason=str(_fp8_gpu_ready()))
def test_fp8_on_gpu_matches_emulated_numerics_and_restores():
    """Real torchao FP8 kernels against the emulation of the same rounding.  Eager backend: the numerics are
    the same as under inductor, and an inductor compile of the float8 subclass takes minutes (H100, 2026-12-07)."""
    from vdit_compile.models.embedded import load_pipeline

    pipe = load_pipeline(weights=None, device="cuda", dtype=torch.bfloat16)
    tr = pipe.transformer
    torch.manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 3, 16, 32, 32, device="cuda", dtype=torch.bfloat16),
              timestep=torch.tensor([500, 500], device="cuda"),
              encoder_hidden_states=torch.randn(2, 16, tr.config.text_dim, device="cuda", dtype=torch.bfloat16),
              return_dict=False)
    w0 = tr.blocks[0].ffn.net[0].proj.weight
    with torch.no_grad():
        ref = tr(**kw)[0].float()
        vc.optimize(tr, plan=TileMask(dense=True), progress=False, fp8="emulate", backend="eager")
        emu = tr(**kw)[0].float()
        with pytest.warns(UserWarning, match="unfused"):
            vc.optimize(tr, plan=TileMask(dense=True), progress=False, fp8="on", backend="eager")
        rep = report_of(tr)["fp8"]
        assert rep["mode"] == "on" and rep["quantized"]
        assert not torch._inductor.config.coordinate_descent_tuning  # torchao asked to leave inductor alone
        w = tr.blocks[0].ffn.net[0].proj.weight
        assert w is not w0 and type(w) not in (torch.Tensor, torch.nn.Parameter)  # a torchao float8 tensor
        out = tr(**kw)[0].float()
    err_emu = ((out - emu).norm() / emu.norm()).item()
    err_ref = ((out - ref).norm() / ref.norm()).item()
    assert err_emu < 0.05, err_emu  # real FP8 kernels vs the fp32 emulation of the same rounding
    assert err_ref < 0.1, err_ref
    vc.restore(tr)
    assert tr.blocks[0].ffn.net[0].proj.weight is w0
    with torch.no_grad():
        torch.testing.assert_close(tr(**kw)[0].float(), ref, rtol=0, atol=0)
