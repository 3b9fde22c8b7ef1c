"""Block-level attention statistics for calibration: the softmax mass of every (query segment, key segment) pair.

Calibration scores every candidate mask of every family from one reduction of a site's attention: for a call's
``q, k`` (``(B, H, L, D)``, video tokens already in unit order) and a partition of the ``L`` tokens into
contiguous *segments* (text prefix, the ``N`` units, text suffix), ``block_mass`` returns

    M[b, h, i, j] = sum over query rows r in segment i of sum over keys c in segment j of softmax(q k^T * scale)[r, c]

(``(B, H, S, S)`` float32; every row of the softmax sums to 1, so ``M[b, h, i].sum() = len(segment i)``).
A mask keeps or drops whole (unit, unit) pairs, so the mass it drops from every query unit follows from ``M``
without touching ``q`` and ``k`` again.

The Triton path is flash-style and never holds ``L x L``: pass 1 computes each row's log-sum-exp with an online
softmax over key blocks; pass 2 (one program per query segment and head) recomputes the scores of one
(query segment, key segment) tile at a time and sums ``exp(s - lse)``. Work: two ``Q K^T`` products, about
the flops of one dense attention forward. :func:`block_mass_reference` is the exact torch fallback (CPU, or no
Triton): blockwise over query rows, ``O(B H r L)`` memory.
"""
from __future__ import annotations

import math

import torch

from .._optional import optional

triton = optional("triton")  # Triton is optional: CPU-only installs use the torch fallback
tl = optional("triton.language") if triton is not None else None

LOG2E = 1.4426950408889634


def segments(prefix: int, num_units: int, unit_tokens: int, suffix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(starts, lengths, group)`` of the segments of a unit-ordered sequence: text prefix (if any), the units,
    text suffix (if any). ``group`` maps a segment to its statistics group: units ``0..N-1``, text ``N``."""
    starts, lens, group = [], [], []
    if prefix:
        starts.append(0), lens.append(prefix), group.append(num_units)
    for u in range(num_units):
        starts.append(prefix + u * unit_tokens), lens.append(unit_tokens), group.append(u)
    if suffix:
        starts.append(prefix + num_units * unit_tokens), lens.append(suffix), group.append(num_units)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)
    return as_t(starts), as_t(lens), as_t(group)


def _check(q, k, starts, lens):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"block_mass expects q and k of equal shape (B, H, L, D); found q{tuple(q.shape)}, k{tuple(k.shape)}")
    L = q.shape[2]
    if starts.dim() != 1 or starts.shape != lens.shape or int(lens.sum()) != L or int(starts[0]) != 0 \
            or not bool((starts[1:] == (starts + lens)[:-1]).all()):
        raise ValueError(f"segments must tile the {L} tokens contiguously from 0; found starts {starts.tolist()[:8]}..., "
                         f"lengths {lens.tolist()[:8]}... (sum {int(lens.sum())})")


@torch.no_grad()
def block_mass_reference(q: torch.Tensor, k: torch.Tensor, scale: float, starts: torch.Tensor, lens: torch.Tensor,
                         block_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Exact ``(B, H, S, S)`` segment mass in float64 arithmetic on ``q``'s device (fp32 for fp16/bf16/fp32 inputs
    would lose little, but the reference is the oracle of the kernel tests)."""
    _check(q, k, starts, lens)
    B, H, L, _ = q.shape
    acc = torch.float64
    dev = q.device
    seg_of = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens.to(dev))  # token -> segment
    S = len(lens)
    out = torch.zeros(B, H, S, S, dtype=acc, device=dev)
    kf = k.to(acc)
    rows = max(1, min(L, block_bytes // max(1, B * H * L * 8 * 2)))
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        p = torch.softmax((q[:, :, r0:r1].to(acc) @ kf.transpose(-1, -2)) * scale, dim=-1)  # (B,H,r,L)
        per_key_seg = torch.zeros(B, H, r1 - r0, S, dtype=acc, device=dev).index_add_(3, seg_of, p)
        out.index_add_(2, seg_of[r0:r1], per_key_seg)
    return out.float()


if triton is not None:

    @triton.jit
    def _lse_kernel(Q, K, IDX, LSE, sqb, sqh, sql, skb, skh, skl, H, L, scale2,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr, HAS_IDX: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        qrow = offs_m
        if HAS_IDX:  # row i of the unit order is token IDX[i] of q / k: no permuted copy is made
            qrow = tl.load(IDX + offs_m, mask=offs_m < L, other=0)
        qp = Q + b * sqb + h * sqh + qrow[:, None] * sql + offs_d[None, :]
        q = tl.load(qp, mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        kb = K + b * skb + h * skh
        for n0 in range(0, L, BLOCK_N):  # the row's lse does not depend on the key order: no index here
            cols = n0 + offs_n
            kt = tl.load(kb + cols[None, :] * skl + offs_d[:, None], mask=(cols[None, :] < L) & (offs_d[:, None] < D),
                         other=0.0)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(cols[None, :] < L, s * scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(LSE + bh * L + qrow, m_i + tl.log2(l_i), mask=offs_m < L)  # indexed by token

    @triton.jit
    def _mass_kernel(Q, K, IDX, LSE, STARTS, LENS, OUT, sqb, sqh, sql, skb, skh, skl, H, L, S, scale2,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IEEE: tl.constexpr, HAS_IDX: tl.constexpr):
        i = tl.program_id(0)  # query segment
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        qs = tl.load(STARTS + i)
        ql = tl.load(LENS + i)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        qb = Q + b * sqb + h * sqh
        kb = K + b * skb + h * skh
        for j in range(S):
            ks = tl.load(STARTS + j)
            kl = tl.load(LENS + j)
            acc = tl.zeros([BLOCK_M], tl.float32)
            for r0 in range(0, ql, BLOCK_M):
                rows = qs + r0 + offs_m
                rmask = (r0 + offs_m) < ql
                qrow = rows
                if HAS_IDX:
                    qrow = tl.load(IDX + rows, mask=rmask, other=0)
                q = tl.load(qb + qrow[:, None] * sql + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
                            other=0.0)
                lse = tl.load(LSE + bh * L + qrow, mask=rmask, other=0.0)
                for c0 in range(0, kl, BLOCK_N):
                    cols = ks + c0 + offs_n
                    cmask = (c0 + offs_n) < kl
                    if HAS_IDX:
                        cols = tl.load(IDX + cols, mask=cmask, other=0)
                    kt = tl.load(kb + cols[None, :] * skl + offs_d[:, None], mask=cmask[None, :] & (offs_d[:, None] < D),
                                 other=0.0)
                    if IEEE:
                        s = tl.dot(q, kt, input_precision="ieee")
                    else:
                        s = tl.dot(q, kt)
                    p = tl.exp2(s * scale2 - lse[:, None])
                    p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
                    acc += tl.sum(p, 1)
            tl.store(OUT + (bh * S + i) * S + j, tl.sum(acc, 0))


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, scale: float, starts: torch.Tensor, lens: torch.Tensor,
                      index: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The Triton path of :func:`block_mass` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("block_mass_triton needs Triton, which is not installed")
    _check(q, k, starts, lens)
    B, H, L, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    dev = q.device
    S = len(lens)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=dev)
    out = torch.empty(B, H, S, S, dtype=torch.float32, device=dev)
    bd = max(16, triton.next_power_of_2(D))
    ieee = q.dtype == torch.float32
    scale2 = float(scale) * LOG2E
    idx = index.to(device=dev, dtype=torch.int32) if index is not None else lse  # unused pointer when None
    has_idx = index is not None
    _lse_kernel[(triton.cdiv(L, block_m), B * H)](q, k, idx, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                                                  k.stride(1), k.stride(2), H, L, scale2, D=D, BLOCK_M=block_m,
                                                  BLOCK_N=block_n, BLOCK_D=bd, IEEE=ieee, HAS_IDX=has_idx)
    st, ln = starts.to(device=dev, dtype=torch.int32), lens.to(device=dev, dtype=torch.int32)
    _mass_kernel[(S, B * H)](q, k, idx, lse, st, ln, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                             k.stride(2), H, L, S, scale2, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, IEEE=ieee,
                             HAS_IDX=has_idx)
    return out


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float | None, starts: torch.Tensor, lens: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, S, S)`` float32 segment mass (module doc): Triton on CUDA, the exact torch reduction elsewhere.

    ``index`` (``(L,)``): segments are stated over ``q[:, :, index]`` / ``k[:, :, index]`` (the unit order), read
    in place by the kernel (no permuted copy of ``q`` and ``k``)."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.is_cuda and triton is not None:
        return block_mass_triton(q, k, scale, starts, lens, index)
    if index is not None:
        idx = index.to(q.device)
        q, k = q[:, :, idx], k[:, :, idx]
    return block_mass_reference(q, k, scale, starts, lens)
