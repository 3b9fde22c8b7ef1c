"""The Triton kernels on a CUDA GPU (skipped on CPU): bf16/fp16 against the fp32 dense oracle.

Every case draws fresh random inputs, writes into NaN-poisoned outputs/gradients and checks
every element of out, lse, dq, dk, dv (with an lse gradient term).  Default (table) tile
shapes are used, so the 128-token blocks straddle frame and text boundaries for P below,
equal to and above the block size.  The oracle cases run once per forward path
(``KernelOptions.path`` = ``portable`` / ``tma``; ``tma`` is skipped below sm90).
"""
import time
import zlib

import pytest
import torch

from vdit_compile import TileMask, TokenLayout
from vdit_compile.masks.tile import frame_masks
from vdit_compile.ops.args import encode_masks, op_grid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PATHS = ["portable", "tma"]


@pytest.fixture(params=PATHS)
def path(request):
    """Force one forward path for the test (the TMA one needs sm90+)."""
    if request.param == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward needs an sm90+ GPU")
    from vdit_compile.kernels.options import kernel_options

    with kernel_options(path=request.param):
        yield request.param

BF16 = dict(dtype=torch.bfloat16, tol=(2e-2, 2e-2), grad_tol=(3e-2, 3e-2))
FP16 = dict(dtype=torch.float16, tol=(4e-3, 4e-3), grad_tol=(1e-2, 1e-2))


def _sq(layout, masks):
    from vdit_compile.kernels.visit import Side

    s = Side.of(layout)
    return s, s, frame_masks(masks, layout.num_frames)


CASES = [
    ("P=100<block, prefix+suffix, 4 head masks", TokenLayout(3, 10, 10, 7, 9),
     [TileMask(1, 0), TileMask(0, 1), TileMask(dense=True), TileMask(0, 0)], dict(head_dim=64, batch=2, **BF16)),
    ("P=128=block", TokenLayout(4, 8, 16), [TileMask(0, 0)], dict(heads=2, head_dim=96, **FP16)),
    ("P=200>block, suffix", TokenLayout(3, 10, 20, text_suffix=50), [TileMask(2, 0), TileMask(0, 0)], dict(head_dim=128, **BF16)),
    ("T=1, prefix", TokenLayout(1, 300, 1, text_prefix=20), [TileMask(0, 0)], dict(heads=2, head_dim=96, **BF16)),
    ("dense mask", TokenLayout(5, 150, 1, 30, 30), [TileMask(dense=True)], dict(heads=2, head_dim=128, batch=2, **FP16)),
    ("(B,L,H,D) strided", TokenLayout(4, 90, 1, text_prefix=33), [TileMask(1, 0), TileMask(0, 1)], dict(head_dim=96, blhd=True, **BF16)),
    ("D=96 padded to 128", TokenLayout(3, 130, 1, text_suffix=17), [TileMask(1, 0)], dict(heads=2, head_dim=96, d_mode="pad", **BF16)),
    # the sm90 D=128 row uses 256-token query blocks: P below (200) and above (300) it, with text on both sides
    ("D=128, P=300>256-block, prefix+suffix", TokenLayout(4, 20, 15, 11, 13), [TileMask(1, 0), TileMask(0, 1)],
     dict(head_dim=128, batch=2, **BF16)),
    ("fp32 exact (precision 'highest': ieee dots)", TokenLayout(3, 10, 10, 5, 0), [TileMask(1, 0)],
     dict(heads=1, head_dim=32, dtype=torch.float32, tol=(1e-4, 1e-4), grad_tol=(1e-4, 1e-4))),
]
FP32_TF32 = ("fp32 with TF32 (precision 'high')", TokenLayout(3, 10, 10, 5, 0), [TileMask(1, 0), TileMask(0, 0)],
             dict(head_dim=32, dtype=torch.float32, tol=(5e-3, 5e-3), grad_tol=(1e-2, 1e-2)))


@pytest.mark.parametrize("name,layout,masks,kw", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_dense_oracle(name, layout, masks, kw, path):
    from vdit_compile.kernels.checks import check_case

    kw = dict(kw)
    kw.setdefault("heads", len(masks))
    check_case(*_sq(layout, masks), device="cuda", seed=zlib.crc32(name.encode()) % 1000, **kw)


def test_fp32_follows_torch_matmul_precision(path):
    """fp32 inputs use TF32 dots only when torch's fp32 matmul precision allows it (and stay exact otherwise)."""
    from vdit_compile.kernels.checks import check_case
    from vdit_compile.kernels.tile_attention_triton import _dot_prec

    name, layout, masks, kw = FP32_TF32
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_prec(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _dot_prec(torch.float32) == "tf32"
        check_case(*_sq(layout, masks), heads=len(masks), device="cuda", seed=7, **kw)
    finally:
        torch.set_float32_matmul_precision(before)


def test_rectangular_random_mask(path):
    from vdit_compile.kernels.checks import check_case
    from vdit_compile.kernels.visit import Side

    g = torch.Generator().manual_seed(0)
    qs, ks = Side(3 * 170 + 40, 40, 3, 170), Side(5 * 150 + 9, 0, 5, 150)
    fm = torch.rand(2, 3, 5, generator=g) < 0.5
    check_case(qs, ks, fm, heads=2, head_dim=64, device="cuda", **BF16)


def test_op_under_torch_compile_with_backward(path):
    """``torch.ops.vdit.tile_attention`` dispatches to the kernel and compiles without graph breaks."""
    from vdit_compile.ops import dense_masked_attention

    layout = TokenLayout(3, 11, 13, text_prefix=5, text_suffix=4)
    masks = [TileMask(1, 0), TileMask(dense=True), TileMask(0, 1)]
    grid, names = op_grid(layout), encode_masks(masks)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        out, lse = torch.ops.vdit.tile_attention(q, k, v, 5, 4, grid, names, 0.125)
        return out.float().square().sum() + lse.sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    from vdit_compile.kernels.checks import oracle
    from vdit_compile.kernels.visit import Side

    s = Side.of(layout)
    ro, rl = oracle(qr, kr, vr, s, s, frame_masks(masks, 3), 0.125, torch.float32)
    torch.testing.assert_close(ro, dense_masked_attention(qr, kr, vr, layout, frame_masks(masks, 3), 0.125))
    rloss = ro.to(torch.bfloat16).float().square().sum() + rl.sum()
    rgrads = torch.autograd.grad(rloss, (qr, kr, vr))
    torch.testing.assert_close(loss.float(), rloss, rtol=2e-2, atol=1e-1)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


@pytest.fixture
def auto_path():
    from vdit_compile.kernels.options import kernel_options

    with kernel_options(path="auto"):
        yield


def test_automatic_path_choice(auto_path):
    """Unforced: TMA on sm90+ for aligned tensors; a 40-byte row stride (fp16, D = 20) runs the portable kernel, correctly."""
    from vdit_compile.kernels.checks import check_case
    from vdit_compile.kernels.tile_attention_triton import forward_path

    x = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert forward_path(x, x, x) == ("tma" if torch.cuda.get_device_capability()[0] >= 9 else "portable")
    y = torch.randn(1, 2, 64, 20, device="cuda", dtype=torch.float16)
    assert forward_path(y, y, y) == "portable"
    hopper = torch.cuda.get_device_capability()[0] >= 9
    z = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    assert forward_path(z, z, z) == ("tma" if hopper else "portable")  # run 7's capped rows: TMA for every mask
    # a row's tma_max_kept keeps denser masks on the portable kernel
    from dataclasses import replace

    from vdit_compile.kernels.configs import get_configs
    half = replace(get_configs(128, "cuda"), tma_max_kept=0.5)
    assert forward_path(z, z, z, half) == "portable"
    assert forward_path(z, z, z, half, kept=0.2) == ("tma" if hopper else "portable")
    check_case(*_sq(TokenLayout(3, 10, 10, 5, 0), [TileMask(1, 0)]), heads=1, head_dim=20, device="cuda", seed=3, **FP16)


def test_mask_build_is_fast_on_gpu():
    """Visit lists for the largest benchmark layout (Hunyuan 33 x 3600 + 256) build in milliseconds."""
    from vdit_compile.kernels.configs import get_configs
    from vdit_compile.kernels.visit import Side, clear_cache, tile_plan

    layout = TokenLayout(33, 45, 80, text_suffix=256)
    side = Side.of(layout)
    fwd = get_configs(128, "cuda").fwd
    fm = frame_masks([TileMask(1, 1)], 33)
    tile_plan(side, side, fm, 24, "cuda").visits(fwd.block_m, fwd.block_n)  # warm the CUDA kernels
    times = []
    for _ in range(3):
        clear_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tile_plan(side, side, fm, 24, "cuda").visits(fwd.block_m, fwd.block_n)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.05, f"visit-list build took {min(times) * 1e3:.1f} ms"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_family_through_the_op_on_gpu(dtype):
    """Frame tiles, 3D windows and spatial windows (token tiles, reorder, text prefix/suffix, odd tile grid) through
    the op's CUDA path: out, lse and gradients against SDPA with each family's element mask in float32."""
    from vdit_compile import SpatialWindow, Window3D
    from vdit_compile.masks import UnitGrid

    layout = TokenLayout(5, 12, 20, text_prefix=7, text_suffix=9)
    tile = (4, 5)
    masks = [Window3D(1, 1, 1), SpatialWindow(0, 1, g=1), TileMask(1, 0), Window3D(0, 0, 0, g=1)]
    H = len(masks)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, H, layout.seq_len, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True)
               for _ in range(3))
    out, lse = torch.ops.vdit.tile_attention(q, k, v, 7, 9, op_grid(layout, tile), encode_masks(masks), 0.125)
    grid = UnitGrid(5, 12, 20, *tile)
    em = torch.stack([m.element_mask(layout, grid, device="cuda") for m in masks])[None]
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = ((qr @ kr.transpose(-1, -2)) * 0.125).masked_fill(~em, float("-inf"))
    rl = torch.logsumexp(s, -1)
    ro = torch.exp(s - rl[..., None]) @ vr
    torch.testing.assert_close(out.float(), ro, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, rl, rtol=1e-3, atol=1e-3)
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * do.float()).sum() + lse.sum(), (q, k, v))
    rgrads = torch.autograd.grad((ro * do.float()).sum() + rl.sum(), (qr, kr, vr))
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
