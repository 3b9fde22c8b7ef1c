"""Row gather of the CUDA path's token reorder: ``out[b, h, i] = x[b, h, index[i]]``, zeros where ``index[i] < 0``.

Why a kernel: ``ops/reorder.PaddedUnits`` moves q, k, v into kernel order and the output back with one
``index_select`` per tensor plus a zero fill of the pad slots.  On an H100 at the Wan-14B shape that took 5.19 ms
per call (BENCHMARKS.md run 13), 10-29% of a window family's forward and 2.6x one read and one write of the four
tensors at the device's bandwidth.  This kernel reads each row once through the input's strides (a transposed
``(B, L, H, D)`` view needs no copy first) and writes it once, pad rows' zeros in the same pass.

On by default (``KernelOptions.gather_kernel``; also used by ``to_units``/``from_units``, the unpadded reorder)
since an H100 timed it beside ``index_select`` in one run (BENCHMARKS.md run 15, ``benchmarks/families.py
--auto-pad``): the reorder of q, k, v and the output 5.17 -> 2.15 ms at the Wan-14B shape, 2.67 -> 1.12 ms at
Open-Sora-Plan 93f; tested against ``index_select`` under the interpreter and on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, H, L_out, D, sxb, sxh, sxl, sxd,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    in_rows = rows < L_out
    in_cols = cols < D
    idx = tl.load(idx_ptr + rows, mask=in_rows, other=-1).to(tl.int64)
    src = x_ptr + b * sxb + h * sxh + idx[:, None] * sxl + cols[None, :].to(tl.int64) * sxd
    vals = tl.load(src, mask=(idx >= 0)[:, None] & in_cols[None, :], other=0.0)
    dst = out_ptr + (bh * L_out + rows[:, None].to(tl.int64)) * D + cols[None, :]
    tl.store(dst, vals, mask=in_rows[:, None] & in_cols[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, L, D)`` or ``(B, H, L)`` (any strides), ``index`` ``(L_out,)`` integer on ``x``'s device with
    entries in ``[-1, L)``: a new contiguous ``(B, H, L_out[, D])`` tensor, row ``i`` = ``x``'s row ``index[i]``,
    zeros where ``index[i] == -1``."""
    if x.dim() not in (3, 4):
        raise ValueError(f"gather_rows expects (B, H, L, D) or (B, H, L), found shape {tuple(x.shape)}")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64) or index.device != x.device:
        raise ValueError(f"index must be a 1-D integer tensor on {x.device}, found {index.dtype} of shape "
                         f"{tuple(index.shape)} on {index.device}")
    flat = x.dim() == 3
    x4 = x.unsqueeze(-1) if flat else x
    B, H, _, D = x4.shape
    out = torch.empty(B, H, index.numel(), D, dtype=x.dtype, device=x.device)
    if out.numel():
        block_d = max(16, triton.next_power_of_2(D))
        block_r = max(16, min(128, 8192 // block_d))
        grid = (triton.cdiv(index.numel(), block_r), B * H)
        _gather_rows_kernel[grid](x4, index, out, H, index.numel(), D, *x4.stride(), BLOCK_R=block_r,
                                  BLOCK_D=block_d, num_warps=4)
    return out.squeeze(-1) if flat else out
