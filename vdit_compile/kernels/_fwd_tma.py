"""Hopper (sm90+) forward kernel: :mod:`._fwd`'s walk with Q, K, V loaded by TMA through tensor descriptors.

Same arguments (plus ``WS``), visit-list walk, head-dim parts, masking and outputs as
:func:`._fwd.tile_fwd_kernel`; only the loads differ.  Why: TMA copies a whole tile with one
instruction and no address registers, so the ``BLOCK_N x D`` pointer tensors of the portable
loads (a part of its register pressure, see BENCHMARKS.md) go away, and Triton's sm90 pipeliner
can overlap the copies with the wgmma work through mbarriers.  The descriptors are made on the
device, one per (batch, head) and head-dim part, from ``base + b * stride_b + h * stride_h`` with
shape ``[L, HEAD_D]`` and strides ``[stride_l, 1]``: this takes the strided ``(B, L, H, D)``
views the portable kernel takes, as long as TMA's rules hold (16-byte aligned base and row
stride; the launcher checks and otherwise runs the portable kernel).  TMA zero-fills rows past
``L`` and columns past ``HEAD_D`` (pad mode), so no load needs a mask; the scores of keys past
``Lk`` (and the pad keys of padded units, ``KPAD``) are still masked in the boundary loop exactly as in the
portable kernel.

Pipelining depth is the launch's ``num_stages`` (the compiler's software pipeline); nothing in
the kernel depends on it.  ``WS`` asks Triton to warp-specialise the unmasked loop
(``tl.range(..., warp_specialize=True)``: producer/consumer partitions by Triton 3.6's Hopper
pass); off by default.  Compiled for sm_90 with Triton 3.6 (no device), it fails in that pass at
4 warps and changes nothing at 8, so it is kept only to be tried on newer Triton: it has never run on
a GPU and no test covers it (``benchmarks/attention.py --paths tma-ws`` is the way to try it).  Device-side
descriptors need a global scratch buffer per launch, hence ``triton.set_allocator`` (see
``tile_attention_triton._ensure_allocator``).
"""
import triton
import triton.language as tl

from ._fwd import _fwd_state, _fwd_store, _head_cols, _segments, _softmax_step, _visit_span


@triton.jit
def _fwd_inner_tma(
    acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k0d, k1d, v0d, v1d,
    Cols, emask_base, lo, hi,
    Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
    BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, WS: tl.constexpr, TWO_SEG: tl.constexpr, KPAD: tl.constexpr,
    PAD_TAIL: tl.constexpr = False,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for it in tl.range(lo, hi, warp_specialize=WS):
        n0 = tl.load(Cols + it) * BLOCK_N
        k0 = k0d.load([n0, 0])
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if BD1 > 0:
            k1 = k1d.load([n0, BD0])
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        offs_n = n0 + offs_n0
        p, alpha, l_i, m_ij = _softmax_step(qk, m_i, l_i, segq, segq0, offs_n, n0, offs_n < Lk, emask_base, k_pre, k_P,
                                             k_vid_end, nseg_q, nseg_k, k_U, qk_scale, MASKED, TWO_SEG, KPAD,
                                             PAD_TAIL)
        v0 = v0d.load([n0, 0])
        acc0 = acc0 * alpha[:, None]
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0, input_precision=DOT_PREC)
        if BD1 > 0:
            v1 = v1d.load([n0, BD0])
            acc1 = acc1 * alpha[:, None]
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1, input_precision=DOT_PREC)
        m_i = m_ij
    return acc0, acc1, l_i, m_i


@triton.jit
def _descs(base, L, stride_l, HEAD_D: tl.constexpr, ROWS: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """One (batch, head)'s ``[L, HEAD_D]`` matrix as descriptors of ``ROWS x BD0`` and ``ROWS x BD1`` tiles.

    The second part (columns ``BD0..``) needs its own descriptor: a descriptor has one block shape.
    """
    d0 = tl.make_tensor_descriptor(base, shape=[L, HEAD_D], strides=[stride_l, 1], block_shape=[ROWS, BD0])
    if BD1 > 0:
        d1 = tl.make_tensor_descriptor(base, shape=[L, HEAD_D], strides=[stride_l, 1], block_shape=[ROWS, BD1])
    else:
        d1 = d0  # unused: no second part
    return d0, d1


@triton.jit
def tile_fwd_tma_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    HeadPat, RowOrder, Offsets, NumUnmasked, NumPadTail, Cols, EMask,
    H, Lq, Lk, n_rows,
    q_pre, q_P, q_vid_end, nseg_q,
    k_pre, k_P, k_vid_end, nseg_k, k_U,
    qk_scale,
    HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, WS: tl.constexpr = False,
    TWO_SEG: tl.constexpr = False, KPAD: tl.constexpr = False,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pat, qb, start, tail, mid, end = _visit_span(HeadPat, RowOrder, Offsets, NumUnmasked, NumPadTail, pid, h, n_rows,
                                                 KPAD)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    d0, d0_ok, d1, d1_ok = _head_cols(HEAD_D, BD0, BD1)
    q0d, q1d = _descs(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, Lq, stride_ql, HEAD_D, BLOCK_M, BD0, BD1)
    k0d, k1d = _descs(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, Lk, stride_kl, HEAD_D, BLOCK_N, BD0, BD1)
    v0d, v1d = _descs(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, Lk, stride_vl, HEAD_D, BLOCK_N, BD0, BD1)
    q0 = q0d.load([qb * BLOCK_M, 0])
    if BD1 > 0:
        q1 = q1d.load([qb * BLOCK_M, BD0])
    else:
        q1 = q0
    segq = _segments(offs_m, q_pre, q_P, q_vid_end, nseg_q)
    segq0 = _segments(qb * BLOCK_M, q_pre, q_P, q_vid_end, nseg_q)
    emask_base = EMask + pat * nseg_q * nseg_k

    acc0, acc1, l_i, m_i = _fwd_state(BLOCK_M, BD0, BD1)
    acc0, acc1, l_i, m_i = _fwd_inner_tma(
        acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k0d, k1d, v0d, v1d,
        Cols, emask_base, start, tail, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        BD0, BD1, BLOCK_N, False, DOT_PREC, WS, TWO_SEG, KPAD,
    )
    if KPAD:
        acc0, acc1, l_i, m_i = _fwd_inner_tma(
            acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k0d, k1d, v0d, v1d,
            Cols, emask_base, tail, mid, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
            BD0, BD1, BLOCK_N, False, DOT_PREC, False, TWO_SEG, KPAD, True,
        )
    acc0, acc1, l_i, m_i = _fwd_inner_tma(
        acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k0d, k1d, v0d, v1d,
        Cols, emask_base, mid, end, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        BD0, BD1, BLOCK_N, True, DOT_PREC, False, TWO_SEG, KPAD,
    )
    _fwd_store(acc0, acc1, l_i, m_i, O, LSE, b, h, bh, offs_m, m_ok, Lq, stride_ob, stride_oh, stride_ol,
               d0, d0_ok, d1, d1_ok, BD1)
