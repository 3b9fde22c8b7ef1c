"""Triton forward kernel: flash attention over the kept key blocks of each query block.

One program per (query block, batch x head).  It walks its CSR row of the visit list in
two loops: the fully kept blocks without any element mask, then the blocks that straddle
a frame/text boundary (or the sequence end) with the element mask ``E[seg(q), seg(k)]``
gathered from the tiny per-pattern segment table.  Head dims that are not a power of two
are split into two power-of-two parts (96 = 64 + 32) so no padded work is done; ``PAD``
mode (one padded, masked part) exists only to measure what padding would cost.

Portable: plain pointer loads + ``tl.dot`` (mma on sm80, wgmma on sm90 chosen by Triton).
"""
import triton
import triton.language as tl


@triton.jit
def _segments(tok, pre, P, vid_end, nseg):
    """Segment id per token: 0 prefix text, 1..T frames, T+1 suffix text / past the end."""
    seg = (tok - pre) // P + 1
    seg = tl.where(tok < pre, 0, seg)
    return tl.where(tok >= vid_end, nseg - 1, seg)


@triton.jit
def _unpadded(tok, pre, P, U, vid_end):
    """False for the pad tokens of padded units (the last ``P - U`` of every ``P``-token unit), true elsewhere
    (text included; see :mod:`.padding`)."""
    rel = tok - pre
    return ((rel % P) < U) | (rel < 0) | (tok >= vid_end)


@triton.jit
def _load_rows(base, rows, stride_row, cols, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a (rows x cols) tile of a row-major matrix, masking only what the flags ask for."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if ROW_MASK and COL_MASK:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROW_MASK:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_MASK:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _tile_keep(seg_r, seg_c, r0, c0, emask_base, stride_r, stride_c, max_r, max_c, TWO_SEG: tl.constexpr):
    """``keep[i, j] = E[seg_r[i], seg_c[j]] != 0`` for one block pair (shared with the backward kernels).

    ``r0`` / ``c0``: segment of the block's first row / column; ``max_r`` / ``max_c``: the last segment id.
    ``TWO_SEG`` (the launcher sets it when every frame is at least as long as the block on both sides, so a
    block spans at most two consecutive segments): four scalar loads of ``E`` and one select per element.
    Otherwise one gather from ``E`` per element.  Why: the gather was a third of the forward's time where
    boundary blocks are common (CogVideoX g0w0 on an H200, ``benchmarks/kernel_anatomy.py``, BENCHMARKS.md).
    """
    if TWO_SEG:
        r1 = tl.minimum(r0 + 1, max_r)
        c1 = tl.minimum(c0 + 1, max_c)
        e00 = tl.load(emask_base + r0 * stride_r + c0 * stride_c) != 0
        e01 = tl.load(emask_base + r0 * stride_r + c1 * stride_c) != 0
        e10 = tl.load(emask_base + r1 * stride_r + c0 * stride_c) != 0
        e11 = tl.load(emask_base + r1 * stride_r + c1 * stride_c) != 0
        second_r = seg_r > r0
        keep_first_c = tl.where(second_r, e10, e00)
        keep_second_c = tl.where(second_r, e11, e01)
        return tl.where((seg_c > c0)[None, :], keep_second_c[:, None], keep_first_c[:, None])
    else:
        return tl.load(emask_base + seg_r[:, None] * stride_r + seg_c[None, :] * stride_c) != 0


@triton.jit
def _softmax_step(qk, m_i, l_i, segq, segq0, offs_n, n_start, n_ok, emask_base, k_pre, k_P, k_vid_end, nseg_q, nseg_k,
                  k_U, qk_scale, MASKED: tl.constexpr, TWO_SEG: tl.constexpr, KPAD: tl.constexpr,
                  PAD_TAIL: tl.constexpr = False):
    """Online-softmax update for one key block: ``(p, alpha, l_i, m_new)`` (shared with :mod:`._fwd_tma`).

    Masked blocks look up ``E[seg(q), seg(k)]`` (:func:`_tile_keep`) and drop keys past the end (and, ``KPAD``,
    the pad keys of padded units: ``k_U`` real tokens per ``k_P``); unmasked ones skip all of it (the visit
    lists never run a block holding pad keys unmasked).  ``PAD_TAIL`` (an unmasked block whose keys include pad):
    the pad keys alone are dropped, by one column predicate.  ``segq0``: segment of the block's first query;
    ``n_start``: its first key.
    """
    if MASKED:
        segk = _segments(offs_n, k_pre, k_P, k_vid_end, nseg_k)
        segk0 = _segments(n_start, k_pre, k_P, k_vid_end, nseg_k)
        keep = _tile_keep(segq, segk, segq0, segk0, emask_base, nseg_k, 1, nseg_q - 1, nseg_k - 1, TWO_SEG)
        if KPAD:
            keep = keep & (n_ok & _unpadded(offs_n, k_pre, k_P, k_U, k_vid_end))[None, :]
        else:
            keep = keep & n_ok[None, :]
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    elif PAD_TAIL:
        qk = tl.where(_unpadded(offs_n, k_pre, k_P, k_U, k_vid_end)[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_ij


@triton.jit
def _fwd_inner(
    acc0, acc1, l_i, m_i, q0, q1, segq, segq0,
    k_base, v_base, stride_kl, stride_vl,
    Cols, emask_base, lo, hi,
    Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
    d0, d0_ok, d1, d1_ok,
    HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SEG: tl.constexpr, KPAD: tl.constexpr,
    PAD_TAIL: tl.constexpr = False,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for it in range(lo, hi):
        kb = tl.load(Cols + it)
        offs_n = kb * BLOCK_N + offs_n0
        n_ok = offs_n < Lk
        k0 = _load_rows(k_base, offs_n, stride_kl, d0, n_ok, d0_ok, MASKED, BD0 > HEAD_D)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if BD1 > 0:
            k1 = _load_rows(k_base, offs_n, stride_kl, d1, n_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        p, alpha, l_i, m_ij = _softmax_step(qk, m_i, l_i, segq, segq0, offs_n, kb * BLOCK_N, n_ok, emask_base, k_pre,
                                             k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale, MASKED, TWO_SEG, KPAD,
                                             PAD_TAIL)
        v0 = _load_rows(v_base, offs_n, stride_vl, d0, n_ok, d0_ok, MASKED, BD0 > HEAD_D)
        acc0 = acc0 * alpha[:, None]
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0, input_precision=DOT_PREC)
        if BD1 > 0:
            v1 = _load_rows(v_base, offs_n, stride_vl, d1, n_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            acc1 = acc1 * alpha[:, None]
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1, input_precision=DOT_PREC)
        m_i = m_ij
    return acc0, acc1, l_i, m_i


@triton.jit
def _fwd_store(acc0, acc1, l_i, m_i, O, LSE, b, h, bh, offs_m, m_ok, Lq, stride_ob, stride_oh, stride_ol,
               d0, d0_ok, d1, d1_ok, BD1: tl.constexpr):
    """Normalised output and LSE of one query block (pointer stores: ``out`` may be any unit-last-stride tensor)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    # natural-log LSE of the scaled scores; rows that see no key get -inf (and a zero output)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_ol + d0[None, :]
    tl.store(o_ptrs, (acc0 / l_safe[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None] & d0_ok[None, :])
    if BD1 > 0:
        o_ptrs1 = o_base + offs_m[:, None] * stride_ol + d1[None, :]
        tl.store(o_ptrs1, (acc1 / l_safe[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None] & d1_ok[None, :])


@triton.jit
def _fwd_state(BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """Empty running state: accumulators per head-dim part, row sums, row maxima (finite: no inf - inf)."""
    acc0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    if BD1 > 0:
        acc1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    else:
        acc1 = acc0  # unused: no second part
    return acc0, acc1, tl.zeros([BLOCK_M], dtype=tl.float32), tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)


@triton.jit
def _head_cols(HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """Column indices (and in-range flags) of the two head-dim parts; the second is a dummy when ``BD1 == 0``."""
    d0 = tl.arange(0, BD0)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
    else:
        d1 = d0  # unused: no second part
    return d0, d0 < HEAD_D, d1, d1 < HEAD_D


@triton.jit
def _visit_span(HeadPat, RowOrder, Offsets, NumUnmasked, NumPadTail, pid, h, n_rows, KPAD: tl.constexpr):
    """Head ``h``'s pattern, this program's row block and its CSR span: unmasked ``[start, tail)``, pad tails
    ``[tail, mid)`` (``KPAD`` only; else ``tail == mid``), masked ``[mid, end)``."""
    pat = tl.load(HeadPat + h)
    qb = tl.load(RowOrder + pat * n_rows + pid)
    row = pat * n_rows + qb
    start = tl.load(Offsets + row)
    mid = start + tl.load(NumUnmasked + row)
    if KPAD:
        tail = mid - tl.load(NumPadTail + row)
    else:
        tail = mid
    return pat, qb, start, tail, mid, tl.load(Offsets + row + 1)


@triton.jit
def tile_fwd_kernel(
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SEG: tl.constexpr = False,
    KPAD: tl.constexpr = False,
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
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q0 = _load_rows(q_base, offs_m, stride_ql, d0, m_ok, d0_ok, True, BD0 > HEAD_D)
    if BD1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_ql, d1, m_ok, d1_ok, True, BD0 + BD1 > HEAD_D)
    else:
        q1 = q0
    segq = _segments(offs_m, q_pre, q_P, q_vid_end, nseg_q)
    segq0 = _segments(qb * BLOCK_M, q_pre, q_P, q_vid_end, nseg_q)
    emask_base = EMask + pat * nseg_q * nseg_k

    acc0, acc1, l_i, m_i = _fwd_state(BLOCK_M, BD0, BD1)
    acc0, acc1, l_i, m_i = _fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k_base, v_base, stride_kl, stride_vl,
        Cols, emask_base, start, tail, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, False, DOT_PREC, TWO_SEG, KPAD,
    )
    if KPAD:
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k_base, v_base, stride_kl, stride_vl,
            Cols, emask_base, tail, mid, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
            d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, False, DOT_PREC, TWO_SEG, KPAD, True,
        )
    acc0, acc1, l_i, m_i = _fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, segq, segq0, k_base, v_base, stride_kl, stride_vl,
        Cols, emask_base, mid, end, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, True, DOT_PREC, TWO_SEG, KPAD,
    )
    _fwd_store(acc0, acc1, l_i, m_i, O, LSE, b, h, bh, offs_m, m_ok, Lq, stride_ob, stride_oh, stride_ol,
               d0, d0_ok, d1, d1_ok, BD1)
