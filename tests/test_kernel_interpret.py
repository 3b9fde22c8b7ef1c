"""The Triton kernels on the CPU under ``TRITON_INTERPRET=1`` (fp32 and fp16; bf16 dots are wrong there).

Each group runs in a subprocess with the variable set, so it never leaks into other tests
(Triton reads it when a kernel is decorated, i.e. at import).  Every case: fresh random
inputs, NaN-poisoned outputs and gradients, float64 dense-oracle comparison of out, lse,
dq, dk, dv (with an lse gradient term), every element.  The ``tma_*`` groups run the same
cases with ``VDIT_KERNEL_PATH=tma`` (the interpreter emulates tensor descriptors, including
their zero fill past the edges and their alignment checks), so the Hopper forward is checked
here too; a case TMA could not take would raise instead of silently running the portable kernel.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    import torch

    from vdit_compile import TileMask, TokenLayout
    from vdit_compile.kernels.configs import INTERPRET, KernelConfigs, TileConfig
    from vdit_compile.kernels.visit import Side
    from vdit_compile.masks.tile import frame_masks

    def sq(layout, masks):
        s = Side.of(layout)
        return s, s, frame_masks(masks, layout.num_frames)

    f32, f16 = torch.float32, torch.float16
    t32, t16 = (2e-5, 2e-5), (4e-3, 4e-3)
    g16 = (1e-2, 1e-2)
    # register caps (maxnreg) on two kernels: the launch option must reach Triton without changing any result
    big = KernelConfigs(fwd=TileConfig(32, 16, 1, 1, 128), dkdv=TileConfig(16, 32, 1, 1, 128), dq=TileConfig(16, 32, 1, 1))
    return {
        "fp32": [
            # P = 10 below the 16-token block, text on both sides, three different heads, D = 48 = 32 + 16
            ("p<block/prefix+suffix/mixed heads", *sq(TokenLayout(3, 2, 5, 3, 5), [TileMask(1, 0), TileMask(0, 1), TileMask(dense=True)]),
             dict(heads=3, head_dim=48, batch=2, dtype=f32, tol=t32)),
            ("T=1 with prefix", *sq(TokenLayout(1, 20, 1, text_prefix=4), [TileMask(0, 0)]),
             dict(heads=2, head_dim=32, dtype=f32, tol=t32)),
            ("D=48 padded to 64 (pad mode)", *sq(TokenLayout(2, 9, 1, text_suffix=3), [TileMask(0, 0)]),
             dict(heads=1, head_dim=48, dtype=f32, tol=t32, d_mode="pad")),
            # P = 40: every block of all three kernels spans at most two segments -> the four-load mask lookup
            ("frames >= every block, prefix+suffix", *sq(TokenLayout(3, 5, 8, 7, 5), [TileMask(1, 0), TileMask(0, 1)]),
             dict(heads=2, head_dim=32, dtype=f32, tol=t32)),
            ("rectangular random mask", Side(37, 2, 5, 7), Side(29, 0, 3, 9),
             torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)[None],
             dict(heads=2, head_dim=32, dtype=f32, tol=t32)),
        ],
        "fp16": [
            ("P = block", *sq(TokenLayout(4, 4, 4), [TileMask(0, 0)]), dict(heads=2, head_dim=32, dtype=f16, tol=t16, grad_tol=g16)),
            ("P > block, suffix, g=T", *sq(TokenLayout(2, 23, 1, text_suffix=6), [TileMask(0, 0), TileMask(2, 0)]),
             dict(heads=2, head_dim=64, dtype=f16, tol=t16, grad_tol=g16)),
            ("dense mask, bigger tiles", *sq(TokenLayout(3, 7, 1, 2, 3), [TileMask(dense=True)]),
             dict(heads=1, head_dim=32, batch=2, dtype=f16, tol=t16, grad_tol=g16, configs=big)),
            ("frames >= every block, prefix+suffix", *sq(TokenLayout(3, 5, 8, 7, 5), [TileMask(0, 0), TileMask(1, 1)]),
             dict(heads=2, head_dim=32, dtype=f16, tol=t16, grad_tol=g16)),
            ("(B,L,H,D) strided view", *sq(TokenLayout(3, 6, 1, text_prefix=5), [TileMask(1, 0), TileMask(0, 1)]),
             dict(heads=2, head_dim=32, dtype=f16, tol=t16, grad_tol=g16, blhd=True, configs=INTERPRET)),
        ],
    }


def _op_path_case():
    """The op end to end through the kernels (every family: frame tiles with a dense head, a 3D window and a
    spatial window on token tiles, so the reorder runs too) against SDPA with the family's element mask."""
    import importlib

    import torch

    from vdit_compile import SpatialWindow, TileMask, TokenLayout, Window3D
    from vdit_compile.masks import UnitGrid

    op_mod = importlib.import_module("vdit_compile.ops.tile_attention")
    from vdit_compile.ops.args import encode_masks, op_grid

    op_mod._TRITON = None
    assert op_mod._triton_impl() is not None, "the interpreter must run the Triton kernels here"
    g = torch.Generator().manual_seed(5)
    layout = TokenLayout(3, 4, 6, text_prefix=2, text_suffix=3)
    tile = (2, 3)
    masks = [TileMask(1, 0), TileMask(dense=True), Window3D(1, 0, 1), SpatialWindow(0, 0, g=1)]
    H = len(masks)
    q, k, v, do = (torch.randn(2, H, layout.seq_len, 32, generator=g) for _ in range(4))
    dlse = torch.randn(2, H, q.shape[2], generator=g)
    args = (layout.text_prefix, layout.text_suffix, op_grid(layout, tile), encode_masks(masks), 0.25)
    out, lse = op_mod._forward(op_mod._cuda_forward_units, q, k, v, *args)
    grid = UnitGrid(3, 4, 6, *tile)
    em = torch.stack([m.element_mask(layout, grid) for m in masks])[None]
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * 0.25
    s = s.masked_fill(~em, float("-inf"))
    rl = torch.logsumexp(s, -1)
    ro = torch.exp(s - rl[..., None]) @ vd
    torch.testing.assert_close(out.double(), ro.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), rl.detach(), rtol=2e-5, atol=2e-5)
    grads = op_mod._backward(op_mod._cuda_backward_units, do, dlse, q, k, v, out, lse, *args)
    rg = torch.autograd.grad((ro * do.double()).sum() + (rl * dlse.double()).sum(), (qd, kd, vd))
    for a, b in zip(grads, rg):
        torch.testing.assert_close(a.double(), b, rtol=5e-5, atol=5e-5)


def _tma_rules_case():
    """TMA's alignment rules: a 40-byte row stride (fp16, D = 20) is refused, forcing it raises."""
    import torch

    from vdit_compile.kernels import tile_attention_triton as tat
    from vdit_compile.kernels.configs import INTERPRET

    ok = torch.randn(1, 2, 40, 32, dtype=torch.float16)
    bad = torch.randn(1, 2, 40, 20, dtype=torch.float16)
    assert tat._tma_misfit(ok, ok, ok, INTERPRET) is None
    assert "16-byte" in tat._tma_misfit(bad, bad, bad, INTERPRET)
    assert tat.forward_path(ok, ok, ok) == "tma"
    try:
        tat.forward_path(bad, bad, bad)
    except RuntimeError as exc:
        assert "kernel path 'tma' was asked for" in str(exc)
    else:
        raise AssertionError("forced TMA on a misaligned tensor did not raise")


def _run_group(group: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vdit_compile.kernels.checks import check_case
    from vdit_compile.kernels.options import current

    tma = group.startswith("tma_")
    assert tma == (current().path == "tma")  # the subprocess's VDIT_KERNEL_PATH, read once at import
    dtype_group = group.removeprefix("tma_")
    for i, (name, qs, ks, fm, kw) in enumerate(_cases()[dtype_group]):
        errs = check_case(qs, ks, fm, seed=100 + i, **kw)
        print(f"ok {group} {name}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    if dtype_group == "fp32":
        _op_path_case()
        print("ok op path", flush=True)
        # the same two-segment layout with the per-element gather forced: both lookups must agree with the oracle
        from vdit_compile.kernels.options import kernel_options

        name, qs, ks, fm, kw = next(c for c in _cases()["fp32"] if c[0].startswith("frames >= every block"))
        with kernel_options(mask_gather=True):
            errs = check_case(qs, ks, fm, seed=7, **kw)
        print(f"ok {group} {name}, gather forced: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    if group == "tma_fp16":
        _tma_rules_case()
        print("ok tma rules", flush=True)


GROUPS = ["fp32", "fp16", "tma_fp32", "tma_fp16"]


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_under_interpreter(group):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("VDIT_KERNEL_PATH", None)
    if group.startswith("tma_"):
        env["VDIT_KERNEL_PATH"] = "tma"
    r = subprocess.run([sys.executable, __file__, group], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"interpreter group {group} failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.count("ok ") == len(_cases()[group.removeprefix("tma_")]) + 2 * group.endswith("fp32") + (group == "tma_fp16"), r.stdout


def test_forward_path_selection_without_gpu(monkeypatch):
    """No sm90 GPU and no interpreter: automatic and ``portable`` pick the portable kernel, forced TMA raises."""
    import torch

    pytest.importorskip("triton")
    from vdit_compile.kernels import tile_attention_triton as tat

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 2, 40, 32, dtype=torch.float16)
    from vdit_compile.kernels.options import KernelOptions, kernel_options

    for value, want in (("portable", "portable"), ("auto", "portable")):
        with kernel_options(path=value):
            assert tat.forward_path(x, x, x) == want
    with kernel_options(path="tma"), pytest.raises(RuntimeError, match="sm90"):
        tat.forward_path(x, x, x)
    with pytest.raises(ValueError, match="kernel path 'fast'"):
        KernelOptions(path="fast")
    # the debug environment is read by from_env alone (once, at import, for the defaults)
    assert KernelOptions.from_env({"VDIT_KERNEL_PATH": "TMA", "VDIT_MASK_GATHER": "1"}) == KernelOptions("tma", mask_gather=True)
    with pytest.raises(ValueError, match="VDIT_KERNEL_PATH='fast'"):
        KernelOptions.from_env({"VDIT_KERNEL_PATH": "fast"})


def test_two_segment_rule(monkeypatch):
    """The four-load mask lookup is chosen exactly when frames are at least a block long on both sides."""
    from vdit_compile import TokenLayout
    from vdit_compile.kernels.options import kernel_options
    from vdit_compile.kernels.tile_attention_triton import two_segment_blocks
    from vdit_compile.kernels.visit import Side, tile_plan
    from vdit_compile.masks.tile import TileMask

    side = Side.of(TokenLayout(3, 5, 8, 7, 5))  # P = 40
    plan = tile_plan(side, side, TileMask(1, 0).frame_mask(3)[None], 1, "cpu")
    assert two_segment_blocks(plan, 32, 40) and not two_segment_blocks(plan, 64, 32) and not two_segment_blocks(plan, 32, 41)
    short = Side(30, 0, 3, 10)
    rect = tile_plan(side, short, TileMask(0, 0).frame_mask(3)[None], 1, "cpu")  # queries P = 40, keys P = 10
    assert two_segment_blocks(rect, 32, 8) and not two_segment_blocks(rect, 32, 16)
    with kernel_options(mask_gather=True):
        assert not two_segment_blocks(plan, 16, 16)


def test_register_cap_is_a_launch_option_and_an_override_field(monkeypatch):
    from vdit_compile.kernels.configs import TileConfig, get_configs
    from vdit_compile.kernels.options import kernel_options

    assert TileConfig(128, 64, 8, 2).launch() == {"num_warps": 8, "num_stages": 2}
    assert TileConfig(128, 64, 8, 2, 128).launch() == {"num_warps": 8, "num_stages": 2, "maxnreg": 128}
    with kernel_options(tile_config="fwd=32,16,1,1,96;dq=16,16,1,1"):
        c = get_configs(64, "cpu")
    assert c.fwd == TileConfig(32, 16, 1, 1, 96) and c.dq.maxnreg == 0
    with kernel_options(tile_config="fwd=32,16,1"), pytest.raises(ValueError, match="maxnreg"):
        get_configs(64, "cpu")


def test_fwd_tma_config_row(monkeypatch):
    """``fwd_tma`` defaults to the ``fwd`` row and has its own ``tile_config`` entry."""
    from vdit_compile.kernels.configs import get_configs
    from vdit_compile.kernels.options import kernel_options

    with kernel_options(tile_config=None):
        base = get_configs(64, "cpu")
    assert base.fwd_tma is None and base.tma_fwd == base.fwd
    with kernel_options(tile_config="fwd_tma=32,16,1,1"):
        c = get_configs(64, "cpu")
    assert c.fwd == base.fwd and (c.tma_fwd.block_m, c.tma_fwd.block_n) == (32, 16)


def test_table_row_decides_tma_where_it_fits(monkeypatch, tmp_path):
    """Where TMA could run, the automatic choice follows the row's ``tma_max_kept`` (every sm90 row: always)."""
    import json
    from dataclasses import replace

    import torch

    pytest.importorskip("triton")
    from vdit_compile.kernels import configs
    from vdit_compile.kernels import tile_attention_triton as tat
    from vdit_compile.kernels.options import kernel_options

    monkeypatch.setattr(tat, "_tma_misfit", lambda q, k, v, cfgs: None)
    monkeypatch.setattr(tat, "interpreting", lambda: False)
    x = torch.randn(1, 2, 40, 32, dtype=torch.float16)
    assert tat.forward_path(x, x, x, configs.TABLE[("sm90", 64)]) == "tma"
    assert tat.forward_path(x, x, x, configs.TABLE[("sm90", 64)], kept=1.0) == "tma"
    assert tat.forward_path(x, x, x, configs.TABLE[("sm90", 128)]) == "tma"  # run 7: capped TMA won dense too
    half = replace(configs.TABLE[("sm90", 128)], tma_max_kept=0.5)
    assert tat.forward_path(x, x, x, half) == "portable"          # denser than the row allows
    assert tat.forward_path(x, x, x, half, kept=0.14) == "tma"
    with kernel_options(path="tma"):  # forcing still takes it
        assert tat.forward_path(x, x, x, half) == "tma"
    # a tile_table file can carry the flag too
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"128": {"fwd": [64, 64, 4, 3], "dkdv": [64, 64, 4, 3], "dq": [64, 64, 4, 3], "tma_max_kept": 0.25}}))
    row = configs._table_file(str(path))[128]
    assert row.tma_max_kept == 0.25 and row.fwd_tma is None


if __name__ == "__main__":
    _run_group(sys.argv[1])
