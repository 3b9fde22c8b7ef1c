"""Block statistics for calibration (kernels/block_stats_triton.py): the torch fallback against a dense
softmax oracle, the Triton kernels against the fallback under ``TRITON_INTERPRET=1`` (fp32, fp16; in a
subprocess so the variable never leaks) and on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdit_compile.kernels.block_stats_triton import (
    block_mass,
    block_mass_reference,
    segments,
)

ROOT = Path(__file__).resolve().parents[1]


def _oracle(q, k, scale, starts, lens):
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1)
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
    oh = torch.nn.functional.one_hot(seg, len(lens)).double()
    return torch.einsum("bhqk,qi,kj->bhij", p, oh, oh)


@pytest.mark.parametrize("pre,N,U,suf", [(3, 4, 6, 2), (0, 5, 4, 0), (5, 2, 9, 0), (0, 3, 16, 7)])
def test_reference_matches_dense_oracle(pre, N, U, suf):
    g = torch.Generator().manual_seed(N * 100 + U)
    L = pre + N * U + suf
    q, k = (torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    starts, lens, group = segments(pre, N, U, suf)
    got = block_mass_reference(q, k, 0.7, starts, lens, block_bytes=2000)  # many row blocks
    want = _oracle(q, k, 0.7, starts, lens)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(got.sum(-1).double(), lens.double().expand(2, 3, -1), atol=1e-4)  # rows sum to 1
    assert group.tolist() == ([N] if pre else []) + list(range(N)) + ([N] if suf else [])


def test_bad_segments_are_explained():
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match="tile the 10 tokens"):
        block_mass(q, q, None, torch.tensor([0, 4]), torch.tensor([4, 5]))


_INTERPRET = r'''
import torch
from vdit_compile.kernels.block_stats_triton import block_mass_reference, block_mass_triton, segments
cases = [(3, 4, 6, 2, 48, 16, 16), (0, 3, 20, 5, 16, 16, 32)]
for dtype, tol in ((torch.float32, 2e-4), (torch.float16, 3e-3)):
    for pre, N, U, suf, D, bm, bn in cases:
        g = torch.Generator().manual_seed(N + U + D)
        L = pre + N * U + suf
        q, k = (torch.randn(2, 2, L, D, generator=g).to(dtype) for _ in range(2))
        st, ln, _ = segments(pre, N, U, suf)
        got = block_mass_triton(q, k, D ** -0.5, st, ln, block_m=bm, block_n=bn)
        want = block_mass_reference(q.double(), k.double(), D ** -0.5, st, ln)
        err = ((got - want).abs() / ln.view(1, 1, -1, 1)).max().item()  # per-row mass error
        assert err < tol, (dtype, pre, N, U, suf, err)
        if pre == 0:
            continue
        perm = torch.randperm(L, generator=g)  # segments over a permuted order, read in place
        got = block_mass_triton(q, k, D ** -0.5, st, ln, index=perm, block_m=bm, block_n=bn)
        want = block_mass_reference(q[:, :, perm].double(), k[:, :, perm].double(), D ** -0.5, st, ln)
        assert ((got - want).abs() / ln.view(1, 1, -1, 1)).max().item() < tol
print("OK")
'''


_INTERPRET_FUSED = r'''
import torch
from vdit_compile.kernels.block_stats_triton import block_mass_fused, block_mass_reference, segment_tables, segments
# (prefix, units, unit tokens, suffix, D, block_m, block_n, programs): the two-segment fast path (every segment
# >= block_n: unaligned, aligned, text on both sides), the general path (short units, short text), query blocks
# over several segments, fewer persistent programs than tiles (slots reused), one program
cases = [(17, 3, 20, 16, 16, 16, 16, 3), (0, 4, 32, 0, 32, 32, 16, None), (3, 4, 6, 2, 48, 16, 16, None),
         (7, 5, 4, 3, 16, 32, 16, 2), (0, 3, 24, 5, 16, 64, 16, 1)]
for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 3e-3)):
    for pre, N, U, suf, D, bm, bn, progs in cases:
        g = torch.Generator().manual_seed(N + U + D)
        L = pre + N * U + suf
        q, k = (torch.randn(2, 2, L, D, generator=g).mul(2).to(dtype) for _ in range(2))
        st, ln, _ = segments(pre, N, U, suf)
        perm = torch.randperm(L, generator=g)  # segments over a permuted order, read in place
        for index in (None, perm):
            qq, kk = (x if index is None else x[:, :, index] for x in (q, k))
            want = block_mass_reference(qq.double(), kk.double(), D ** -0.5, st, ln)
            got = block_mass_fused(q, k, D ** -0.5, st, ln, index=index, block_m=bm, block_n=bn, programs=progs,
                                   block_s=16, tables=segment_tables(st, ln, q.device))
            err = ((got - want).abs() / ln.view(1, 1, -1, 1)).max().item()  # per-row mass error
            assert err < tol, (dtype, pre, N, U, suf, index is None, err)
print("OK")
'''


def _interpret(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_triton_kernel_under_interpreter():
    _interpret(_INTERPRET)


def test_fused_kernel_under_interpreter():
    """The one-launch kernel against the fp64 reference: both segment paths, scratch slots reused, index."""
    _interpret(_INTERPRET_FUSED)


def test_fused_config_keeps_two_segment_path():
    from vdit_compile.kernels.block_stats_triton import fused_config

    assert fused_config(128, 120)["block_n"] == 64
    assert fused_config(64, 40)["block_n"] == 32  # shortest segment 40: block_n 32 keeps the fast path
    assert fused_config(64, 5)["block_n"] == 64  # text of 5 tokens: the general path, full-width blocks
    with pytest.raises(ValueError, match="head dims up to"):
        fused_config(512, 120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_on_gpu(dtype):
    pytest.importorskip("triton")
    from vdit_compile.kernels.block_stats_triton import block_mass_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    for pre, N, U, suf, D in ((0, 12, 128, 0, 128), (17, 8, 96, 40, 64), (512, 6, 144, 0, 128)):
        L = pre + N * U + suf
        q, k = (torch.randn(2, 3, L, D, generator=g, device="cuda").to(dtype) for _ in range(2))
        st, ln, _ = segments(pre, N, U, suf)
        want = block_mass_reference(q.double(), k.double(), D ** -0.5, st, ln)
        tol = 2e-3 if dtype == torch.float32 else 2e-2  # fp32 inputs run IEEE dots; 16-bit inputs round q k^T
        for kernel in ("twopass", "fused"):
            got = block_mass_triton(q, k, D ** -0.5, st, ln, kernel=kernel)
            assert ((got - want).abs() / ln.cuda().view(1, 1, -1, 1)).max().item() < tol, kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernel_on_gpu_index_and_short_segments(dtype):
    """The fused kernel on the device: a permuted unit order read in place, segments shorter than a key block
    (the general path), and a query-block count far above the persistent programs."""
    pytest.importorskip("triton")
    from vdit_compile.kernels.block_stats_triton import block_mass_fused

    g = torch.Generator(device="cuda").manual_seed(1)
    for pre, N, U, suf, D in ((226, 40, 135, 0, 64), (5, 30, 24, 7, 96), (0, 64, 120, 0, 128)):
        L = pre + N * U + suf
        q, k = (torch.randn(1, 4, L, D, generator=g, device="cuda").mul(1.5).to(dtype) for _ in range(2))
        st, ln, _ = segments(pre, N, U, suf)
        perm = torch.randperm(L, device="cuda", generator=g)
        got = block_mass_fused(q, k, D ** -0.5, st, ln, index=perm)
        want = block_mass_reference(q[:, :, perm].double(), k[:, :, perm].double(), D ** -0.5, st, ln)
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        assert ((got - want).abs() / ln.cuda().view(1, 1, -1, 1)).max().item() < tol, (pre, N, U, suf, D)


@pytest.mark.parametrize("pre,suf", [(7, 3), (0, 0)])
def test_mass_scores_match_dense_oracle(pre, suf):
    """The calibrator's batched scoring (cached tables, one contraction per chunk) against a brute-force
    score from the dense fp64 softmax: per candidate, per query unit, the mass its mask drops."""
    from vdit_compile.calibration.candidates import keep_tables
    from vdit_compile.calibration.collector import SiteCalibrator, _to_cpu
    from vdit_compile.layout import TokenLayout
    from vdit_compile.masks.units import unit_permutation

    lay = TokenLayout(4, 4, 6, text_prefix=pre, text_suffix=suf)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, lay.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cal = SiteCalibrator("s", lay, 3, families=("tile", "win3d", "spatial"), tile_tokens=4, method="mass")
    cal.observe(q, k, v, 0.4, timestep=3.0)
    idx = torch.cat([torch.arange(pre), pre + unit_permutation(cal.grid), torch.arange(pre + lay.video_tokens, lay.seq_len)])
    starts, lens, group = segments(pre, cal.grid.num_units, cal.grid.unit_tokens, suf)
    seg_mass = _oracle(q[:, :, idx], k[:, :, idx], 0.4, starts, lens)
    G = cal.grid.num_units + 1
    oh = torch.nn.functional.one_hot(group, G).double()
    mass = torch.einsum("bhst,si,tj->bhij", seg_mass, oh, oh)
    dropped = torch.einsum("bhij,cij->bhci", mass, 1 - keep_tables(cal.candidates, cal.grid).double())
    rows = (lens.double() @ oh).clamp(min=1)
    want = ((dropped.square() / rows).sum((0, 3)) / (2 * lay.seq_len)).sqrt()
    assert torch.allclose(cal.candidate_errors(), want, rtol=1e-5, atol=1e-7)
    a, b = _to_cpu(torch.ones(2, 3), torch.zeros(4, dtype=torch.float32))
    assert a.dtype == torch.float64 and a.shape == (2, 3) and b.shape == (4,)
