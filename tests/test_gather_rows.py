"""The Triton row gather of the padded reorder (``kernels/gather_rows_triton.py``) against ``index_select`` with
zeroed pad rows (an independent torch reference), under ``TRITON_INTERPRET=1`` on the CPU and on a GPU: strided
and transposed inputs, 3-D lse-like tensors, head dims that are not powers of two, and ``PaddedUnits`` with the
kernel on and off."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_CHECK = r'''
import torch
from vdit_compile.kernels.gather_rows_triton import gather_rows
from vdit_compile.kernels.options import kernel_options
from vdit_compile.masks.units import UnitGrid
from vdit_compile.ops.reorder import PaddedUnits, from_units, to_units


def reference(x, index):
    out = x.index_select(2, index.clamp(min=0))
    out[:, :, index < 0] = 0
    return out


def check(device, dtype):
    g = torch.Generator().manual_seed(0)
    for B, H, L, D, Lout in ((1, 2, 37, 16, 50), (2, 3, 64, 96, 80), (1, 1, 9, 1, 12)):
        index = torch.randint(-1, L, (Lout,), generator=g)
        index[0] = -1
        x = torch.randn(B, L, H, D, generator=g).to(dtype).to(device).transpose(1, 2)  # a strided view
        idx = index.to(device)
        assert torch.equal(gather_rows(x, idx), reference(x, idx))
        assert torch.equal(gather_rows(x[..., 0], idx), reference(x[..., :1], idx)[..., 0])  # (B, H, L)
    grid = UnitGrid(3, 10, 12, 5, 6)  # 30-token units -> stride 32
    pu = PaddedUnits(grid, 4, 3, 32)
    L = 4 + 3 * 10 * 12 + 3
    for x in (torch.randn(2, 3, L, 24, generator=g), torch.randn(2, 3, L, generator=g)):
        x = x.to(dtype).to(device)
        with kernel_options(gather_kernel=False):
            want = pu.to_kernel(x)
            back_want = pu.from_kernel(want)
        with kernel_options(gather_kernel=True):
            got = pu.to_kernel(x)
            back = pu.from_kernel(got)
        assert torch.equal(got, want) and torch.equal(back, back_want) and torch.equal(back, x)
    unpadded = UnitGrid(4, 6, 10, 3, 5)  # the reorder without padding: text in place, video permuted
    L = 7 + 4 * 6 * 10 + 2
    for x in (torch.randn(1, 2, L, 8, generator=g), torch.randn(1, 2, L, generator=g)):
        x = x.to(dtype).to(device)
        with kernel_options(gather_kernel=False):
            want = to_units(x, 7, unpadded)
        with kernel_options(gather_kernel=True):
            got = to_units(x, 7, unpadded)
            back = from_units(got, 7, unpadded)
        assert torch.equal(got, want) and torch.equal(back, x)
'''


def test_gather_rows_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    script = _CHECK + "\ncheck('cpu', torch.float32)\ncheck('cpu', torch.float16)\nprint('OK')\n"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_gather_rows_rejects_bad_shapes():
    pytest.importorskip("triton")
    from vdit_compile.kernels.gather_rows_triton import gather_rows

    with pytest.raises(ValueError, match=r"\(B, H, L, D\) or \(B, H, L\)"):
        gather_rows(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        gather_rows(torch.zeros(1, 1, 3, 4), torch.zeros(2))


def test_gather_kernel_is_on_by_default_only_where_no_autograd_graph_is_recorded():
    """On by default (measured on an H100), but a plain CPU tensor keeps ``index_select``, and so does a caller
    that differentiates through the reorder (the gather has no backward of its own)."""
    from vdit_compile.kernels.options import KernelOptions, kernel_options
    from vdit_compile.ops.reorder import _use_gather_kernel

    assert KernelOptions().gather_kernel
    with kernel_options(gather_kernel=True):
        if os.environ.get("TRITON_INTERPRET") != "1":
            assert not _use_gather_kernel(torch.zeros(1, 1, 4, 2))


_GRAD_CHECK = r'''
import torch
import vdit_compile.kernels.gather_rows_triton as g
from vdit_compile.masks.units import UnitGrid
from vdit_compile.ops.reorder import from_units, to_units

calls = []
real = g.gather_rows
g.gather_rows = lambda *a: calls.append(1) or real(*a)
grid = UnitGrid(4, 6, 10, 3, 5)
x = torch.randn(1, 2, 7 + 240 + 2, 8, requires_grad=True)
y = to_units(x, 7, grid)  # grad mode on, x requires grad: index_select, differentiable
assert not calls and y.grad_fn is not None
(from_units(y, 7, grid) * torch.arange(x.numel()).view_as(x)).sum().backward()
assert torch.equal(x.grad, torch.arange(x.numel()).view_as(x).float())  # the reorder's gradient is exact
with torch.no_grad():  # as inside the op
    z = to_units(x, 7, grid)
assert calls and torch.equal(z, y.detach())
print("OK")
'''


def test_reorder_keeps_its_gradient_outside_the_op_and_uses_the_gather_inside_no_grad():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _GRAD_CHECK], env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_rows_on_gpu(dtype):
    pytest.importorskip("triton")
    namespace: dict = {}
    exec(compile(_CHECK, "gather_check", "exec"), namespace)
    namespace["check"]("cuda", dtype)
