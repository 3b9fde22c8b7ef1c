"""Triton backward kernels: ``delta`` preprocessing, ``dk/dv`` over key-major visit lists, ``dq``.

FlashAttention-2 style without atomics: the ``dk/dv`` pass owns one key block and walks
the query blocks that see it (the transposed visit list); the ``dq`` pass owns one query
block and walks the same kept key blocks as the forward.  Both recompute ``p`` from the
saved log-sum-exp.  ``delta_i = rowsum(dO * O)_i - dlse_i`` folds the gradient of the
returned LSE in (ring / sequence-parallel merges differentiate through it).

Padded units (``KPAD``, :mod:`.padding`): the ``dq`` pass drops pad keys in its masked blocks and pad tails
(``PAD_TAIL``, one column predicate), so they give no ``dQ``; in the ``dk/dv`` pass pad keys are masked in masked
blocks and run unmasked in pad tails, so their own ``dK, dV`` rows hold anything and are never read back; pad
query rows come with zero ``dO`` and ``dlse`` (the op's gather fills them), so they add nothing to ``dK, dV``,
and their ``dQ`` is discarded.
"""
import triton
import triton.language as tl

from ._fwd import _load_rows, _segments, _tile_keep, _unpadded, _visit_span


@triton.jit
def bwd_preprocess_kernel(
    O, DO, DLSE, Delta,
    stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl,
    H, Lq,
    HEAD_D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BD)
    m_ok = offs_m < Lq
    mask = m_ok[:, None] & (d[None, :] < HEAD_D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ol + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dl + d[None, :], mask=mask, other=0.0)
    row = bh.to(tl.int64) * Lq + offs_m
    dlse = tl.load(DLSE + row, mask=m_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(Delta + row, delta, mask=m_ok)


@triton.jit
def _lse2(lse):
    """LSE in log2 units; rows that saw no key (-inf) get +inf so their p is exactly 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dkdv_inner(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, segk, segk0, n_ok,
    q_base, do_base, stride_ql, stride_dol, lse_base, delta_base,
    Cols, emask_base, lo, hi,
    Lq, q_pre, q_P, q_vid_end, nseg_q, nseg_k, qk_scale,
    d0, d0_ok, d1, d1_ok,
    HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SEG: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    for it in range(lo, hi):
        qb = tl.load(Cols + it)
        offs_m = qb * BLOCK_M + offs_m0
        m_ok = offs_m < Lq
        q0 = _load_rows(q_base, offs_m, stride_ql, d0, m_ok, d0_ok, MASKED, BD0 > HEAD_D)
        qkT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if BD1 > 0:
            q1 = _load_rows(q_base, offs_m, stride_ql, d1, m_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=DOT_PREC)
        if MASKED:
            lse2 = _lse2(tl.load(lse_base + offs_m, mask=m_ok, other=0.0))
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse2 = _lse2(tl.load(lse_base + offs_m))
            delta = tl.load(delta_base + offs_m)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            segq = _segments(offs_m, q_pre, q_P, q_vid_end, nseg_q)
            segq0 = _segments(qb * BLOCK_M, q_pre, q_P, q_vid_end, nseg_q)
            keep = _tile_keep(segk, segq, segk0, segq0, emask_base, 1, nseg_k, nseg_k - 1, nseg_q - 1, TWO_SEG)
            keep = keep & m_ok[None, :] & n_ok[:, None]
            pT = tl.where(keep, pT, 0.0)
        do0 = _load_rows(do_base, offs_m, stride_dol, d0, m_ok, d0_ok, MASKED, BD0 > HEAD_D)
        dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if BD1 > 0:
            do1 = _load_rows(do_base, offs_m, stride_dol, d1, m_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            dv1 = tl.dot(pT.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
        if BD1 > 0:
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def tile_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    HeadPat, RowOrder, Offsets, NumUnmasked, Cols, EMask,
    H, Lq, Lk, n_rows,
    q_pre, q_P, q_vid_end, nseg_q,
    k_pre, k_P, k_vid_end, nseg_k, k_U,
    qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SEG: tl.constexpr = False,
    KPAD: tl.constexpr = False,
):
    """One program per (key block, batch x head); rows of the visit list are key blocks."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pat = tl.load(HeadPat + h)
    kb = tl.load(RowOrder + pat * n_rows + pid)
    row = pat * n_rows + kb
    start = tl.load(Offsets + row)
    mid = start + tl.load(NumUnmasked + row)
    end = tl.load(Offsets + row + 1)

    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    d0 = tl.arange(0, BD0)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
    else:
        d1 = d0  # unused: no second part
    d0_ok = d0 < HEAD_D
    d1_ok = d1 < HEAD_D
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k0 = _load_rows(k_base, offs_n, stride_kl, d0, n_ok, d0_ok, True, BD0 > HEAD_D)
    v0 = _load_rows(v_base, offs_n, stride_vl, d0, n_ok, d0_ok, True, BD0 > HEAD_D)
    dk0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    if BD1 > 0:
        k1 = _load_rows(k_base, offs_n, stride_kl, d1, n_ok, d1_ok, True, BD0 + BD1 > HEAD_D)
        v1 = _load_rows(v_base, offs_n, stride_vl, d1, n_ok, d1_ok, True, BD0 + BD1 > HEAD_D)
        dk1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    else:
        k1, v1, dk1, dv1 = k0, v0, dk0, dv0  # unused: no second part
    segk = _segments(offs_n, k_pre, k_P, k_vid_end, nseg_k)
    segk0 = _segments(kb * BLOCK_N, k_pre, k_P, k_vid_end, nseg_k)
    if KPAD:  # pad keys: masked (their block always is), so they get no dK, dV
        n_live = n_ok & _unpadded(offs_n, k_pre, k_P, k_U, k_vid_end)
    else:
        n_live = n_ok
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = LSE + bh.to(tl.int64) * Lq
    delta_base = Delta + bh.to(tl.int64) * Lq
    emask_base = EMask + pat * nseg_q * nseg_k
    dk0, dk1, dv0, dv1 = _dkdv_inner(
        dk0, dk1, dv0, dv1, k0, k1, v0, v1, segk, segk0, n_live, q_base, do_base, stride_ql, stride_dol,
        lse_base, delta_base, Cols, emask_base, start, mid, Lq, q_pre, q_P, q_vid_end, nseg_q, nseg_k,
        qk_scale, d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_M, False, DOT_PREC, TWO_SEG,
    )
    dk0, dk1, dv0, dv1 = _dkdv_inner(
        dk0, dk1, dv0, dv1, k0, k1, v0, v1, segk, segk0, n_live, q_base, do_base, stride_ql, stride_dol,
        lse_base, delta_base, Cols, emask_base, mid, end, Lq, q_pre, q_P, q_vid_end, nseg_q, nseg_k,
        qk_scale, d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_M, True, DOT_PREC, TWO_SEG,
    )
    dk_base = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    st0 = n_ok[:, None] & d0_ok[None, :]
    tl.store(dk_base + offs_n[:, None] * stride_dkl + d0[None, :], (dk0 * sm_scale).to(DK.dtype.element_ty), mask=st0)
    tl.store(dv_base + offs_n[:, None] * stride_dvl + d0[None, :], dv0.to(DV.dtype.element_ty), mask=st0)
    if BD1 > 0:
        st1 = n_ok[:, None] & d1_ok[None, :]
        tl.store(dk_base + offs_n[:, None] * stride_dkl + d1[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty), mask=st1)
        tl.store(dv_base + offs_n[:, None] * stride_dvl + d1[None, :], dv1.to(DV.dtype.element_ty), mask=st1)


@triton.jit
def _dq_inner(
    dq0, dq1, q0, q1, do0, do1, lse2, delta, segq, segq0,
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
        v0 = _load_rows(v_base, offs_n, stride_vl, d0, n_ok, d0_ok, MASKED, BD0 > HEAD_D)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if BD1 > 0:
            k1 = _load_rows(k_base, offs_n, stride_kl, d1, n_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            v1 = _load_rows(v_base, offs_n, stride_vl, d1, n_ok, d1_ok, MASKED, BD0 + BD1 > HEAD_D)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            segk = _segments(offs_n, k_pre, k_P, k_vid_end, nseg_k)
            segk0 = _segments(kb * BLOCK_N, k_pre, k_P, k_vid_end, nseg_k)
            keep = _tile_keep(segq, segk, segq0, segk0, emask_base, nseg_k, 1, nseg_q - 1, nseg_k - 1, TWO_SEG)
            if KPAD:
                n_ok = n_ok & _unpadded(offs_n, k_pre, k_P, k_U, k_vid_end)
            p = tl.where(keep & n_ok[None, :], p, 0.0)
        elif PAD_TAIL:
            p = tl.where(_unpadded(offs_n, k_pre, k_P, k_U, k_vid_end)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
        if BD1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def tile_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dqb, stride_dqh, stride_dql,
    HeadPat, RowOrder, Offsets, NumUnmasked, NumPadTail, Cols, EMask,
    H, Lq, Lk, n_rows,
    q_pre, q_P, q_vid_end, nseg_q,
    k_pre, k_P, k_vid_end, nseg_k, k_U,
    qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SEG: tl.constexpr = False,
    KPAD: tl.constexpr = False,
):
    """One program per (query block, batch x head), walking the forward's kept key blocks."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pat, qb, start, tail, mid, end = _visit_span(HeadPat, RowOrder, Offsets, NumUnmasked, NumPadTail, pid, h, n_rows,
                                                 KPAD)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    d0 = tl.arange(0, BD0)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
    else:
        d1 = d0  # unused: no second part
    d0_ok = d0 < HEAD_D
    d1_ok = d1 < HEAD_D
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    q0 = _load_rows(q_base, offs_m, stride_ql, d0, m_ok, d0_ok, True, BD0 > HEAD_D)
    do0 = _load_rows(do_base, offs_m, stride_dol, d0, m_ok, d0_ok, True, BD0 > HEAD_D)
    dq0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    if BD1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_ql, d1, m_ok, d1_ok, True, BD0 + BD1 > HEAD_D)
        do1 = _load_rows(do_base, offs_m, stride_dol, d1, m_ok, d1_ok, True, BD0 + BD1 > HEAD_D)
        dq1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    else:
        q1, do1, dq1 = q0, do0, dq0  # unused: no second part
    rows = bh.to(tl.int64) * Lq + offs_m
    lse2 = _lse2(tl.load(LSE + rows, mask=m_ok, other=0.0))
    delta = tl.load(Delta + rows, mask=m_ok, other=0.0)
    segq = _segments(offs_m, q_pre, q_P, q_vid_end, nseg_q)
    segq0 = _segments(qb * BLOCK_M, q_pre, q_P, q_vid_end, nseg_q)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    emask_base = EMask + pat * nseg_q * nseg_k
    dq0, dq1 = _dq_inner(
        dq0, dq1, q0, q1, do0, do1, lse2, delta, segq, segq0, k_base, v_base, stride_kl, stride_vl,
        Cols, emask_base, start, tail, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, False, DOT_PREC, TWO_SEG, KPAD,
    )
    if KPAD:
        dq0, dq1 = _dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, segq, segq0, k_base, v_base, stride_kl, stride_vl,
            Cols, emask_base, tail, mid, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
            d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, False, DOT_PREC, TWO_SEG, KPAD, True,
        )
    dq0, dq1 = _dq_inner(
        dq0, dq1, q0, q1, do0, do1, lse2, delta, segq, segq0, k_base, v_base, stride_kl, stride_vl,
        Cols, emask_base, mid, end, Lk, k_pre, k_P, k_vid_end, nseg_q, nseg_k, k_U, qk_scale,
        d0, d0_ok, d1, d1_ok, HEAD_D, BD0, BD1, BLOCK_N, True, DOT_PREC, TWO_SEG, KPAD,
    )
    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dql + d0[None, :], (dq0 * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d0_ok[None, :])
    if BD1 > 0:
        tl.store(dq_base + offs_m[:, None] * stride_dql + d1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d1_ok[None, :])
