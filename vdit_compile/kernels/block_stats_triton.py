"""Block-level attention statistics for calibration: the softmax mass of every (query segment, key segment) pair.

Calibration scores every candidate mask of every family from one reduction of a site's attention: for a call's
``q, k`` (``(B, H, L, D)``, video tokens already in unit order) and a partition of the ``L`` tokens into
contiguous *segments* (text prefix, the ``N`` units, text suffix), ``block_mass`` returns

    M[b, h, i, j] = sum over query rows r in segment i of sum over keys c in segment j of softmax(q k^T * scale)[r, c]

(``(B, H, S, S)`` float32; every row of the softmax sums to 1, so ``M[b, h, i].sum() = len(segment i)``).
A mask keeps or drops whole (unit, unit) pairs, so the mass it drops from every query unit follows from ``M``
without touching ``q`` and ``k`` again.

The Triton path is flash-style and never holds ``L x L``. ``fused`` (one launch; the default,
``DEFAULT_MASS_KERNEL``, since its first GPU run): a persistent program
takes a block of query rows, sweeps the keys once in unit order with an online softmax (base 2, ``scale * log2 e``
folded into one multiply), and keeps per row the log-sum-exp of every key segment it finishes (a key block of
``BLOCK_N`` columns holds at most two segments when every segment is at least ``BLOCK_N`` long, the constexpr
fast path; shorter segments take a loop over the block's segments); these ``S`` values per row go to the
program's own scratch slot (``BLOCK_M x S`` float32, reused by its next tile, so memory is
``programs x BLOCK_M x S`` whatever ``B, H, L``), and once the row's log-sum-exp is known they become masses
``exp2(lse_rj - lse_r)``, summed over the block's rows per query segment and added (``atomic_add``) into ``M``.
Work: one ``Q K^T`` product and one ``exp2`` per score (a dense forward does two products and one ``exp``).
The earlier ``twopass`` path (pass 1: row log-sum-exp; pass 2: one program per query segment and head
recomputing ``exp(s - lse)`` per (query segment, key segment) tile: two products and two exps per score, and
segment-aligned blocks, so a 130-token unit costs three 64-wide blocks) stays selectable: 1.6-1.9x slower.
:func:`block_mass_reference` is the exact torch fallback (CPU, or no Triton): blockwise over query rows,
``O(B H r L)`` memory. The fused path sums with atomics: bitwise results may differ between runs (by float
rounding of up to three block partials per entry).
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
    def _key_block_scores(q, kb, IDX, cols, cmask, skl, offs_d, D: tl.constexpr, IEEE: tl.constexpr,
                          HAS_IDX: tl.constexpr):
        """``q k^T`` of one key block (columns ``cols`` of the unit order, ``IDX``-mapped to tokens when given)."""
        if HAS_IDX:
            cols = tl.load(IDX + cols, mask=cmask, other=0)
        kt = tl.load(kb + cols[None, :] * skl + offs_d[:, None], mask=cmask[None, :] & (offs_d[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        return s

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
            s = _key_block_scores(q, kb, IDX, cols, cols < L, skl, offs_d, D, IEEE, False)
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
                    cmask = (c0 + offs_n) < kl
                    s = _key_block_scores(q, kb, IDX, ks + c0 + offs_n, cmask, skl, offs_d, D, IEEE, HAS_IDX)
                    p = tl.exp2(s * scale2 - lse[:, None])
                    p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
                    acc += tl.sum(p, 1)
            tl.store(OUT + (bh * S + i) * S + j, tl.sum(acc, 0))


#: Fixed tile configurations of the fused kernel by head dimension (no autotuning: calibration calls each shape a
#: handful of times, an autotune sweep would cost more than it saves).  ``block_n`` is lowered to the shortest
#: segment's length when that is smaller (power of two, >= 16), so the two-segment fast path applies.
FUSED_CONFIGS = {  # max head dim: (block_m, block_n, num_warps, num_stages)
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 8, 2),
}
#: Persistent programs per SM of the fused kernel (each owns a ``block_m x S`` float32 scratch slot).
PROGRAMS_PER_SM = 2


def fused_config(head_dim: int, min_segment: int) -> dict:
    """``block_m, block_n, num_warps, num_stages`` of the fused kernel for this head dimension (``FUSED_CONFIGS``)."""
    for d in sorted(FUSED_CONFIGS):
        if head_dim <= d:
            bm, bn, w, st = FUSED_CONFIGS[d]
            break
    else:
        raise ValueError(f"block statistics support head dims up to {max(FUSED_CONFIGS)}, found {head_dim}")
    if min_segment < bn:  # keep the two-segment fast path when the shortest segment allows it
        bn = max(16, 1 << (int(min_segment).bit_length() - 1)) if min_segment >= 16 else bn
    return {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}


if triton is not None:

    @triton.jit
    def _fused_kernel(Q, K, IDX, SEG, ENDS, SCR, OUT, sqb, sqh, sql, skb, skh, skl, H, L, S, n_row_blocks, total,
                      scale2, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_S: tl.constexpr, IEEE: tl.constexpr, HAS_IDX: tl.constexpr, TWO_SEG: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK_S)
        scr = SCR + pid * S * BLOCK_M  # this program's slot: (S, BLOCK_M) per-row, per-key-segment log2-sum-exp
        for tile in range(pid, total, tl.num_programs(0)):
            bh = tile // n_row_blocks
            r0 = (tile % n_row_blocks) * BLOCK_M
            b, h = bh // H, bh % H
            rows = r0 + offs_m  # positions in unit order
            rmask = rows < L
            qrow = rows
            if HAS_IDX:  # position i of the unit order is token IDX[i] of q / k: read in place
                qrow = tl.load(IDX + rows, mask=rmask, other=0)
            q = tl.load(Q + b * sqb + h * sqh + qrow[:, None] * sql + offs_d[None, :],
                        mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
            kb = K + b * skb + h * skh
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M], tl.float32)  # the open key segment's sum, relative to m_i
            for n0 in range(0, L, BLOCK_N):
                cols = n0 + offs_n
                cmask = cols < L
                s = _key_block_scores(q, kb, IDX, cols, cmask, skl, offs_d, D, IEEE, HAS_IDX)
                s = tl.where(cmask[None, :], s * scale2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                acc = acc * alpha
                l_i = l_i * alpha
                m_i = m_new
                sj = tl.load(SEG + cols, mask=cmask, other=S)  # key segment of each column
                j0 = tl.load(SEG + n0)
                jl = tl.load(SEG + tl.minimum(n0 + BLOCK_N, L) - 1)
                bend = n0 + BLOCK_N
                if TWO_SEG:  # every segment >= BLOCK_N: the block holds j0 (maybe ending here) and at most jl after it
                    x0 = tl.sum(tl.where(sj[None, :] == j0, p, 0.0), 1)
                    x1 = tl.sum(tl.where(sj[None, :] > j0, p, 0.0), 1)  # padded columns have p = 0
                    l_i += x0 + x1
                    t0 = acc + x0
                    fin = tl.load(ENDS + j0) <= bend
                    tl.store(scr + j0 * BLOCK_M + offs_m, m_i + tl.log2(t0), mask=offs_m < tl.where(fin, BLOCK_M, 0))
                    acc = tl.where(fin, x1, t0)  # jl (if any) cannot end in this block
                else:
                    for j in range(j0, jl + 1):
                        x = tl.sum(tl.where(sj[None, :] == j, p, 0.0), 1)
                        l_i += x
                        t = tl.where(j == j0, acc, 0.0) + x
                        fin = tl.load(ENDS + j) <= bend
                        tl.store(scr + j * BLOCK_M + offs_m, m_i + tl.log2(t), mask=offs_m < tl.where(fin, BLOCK_M, 0))
                        acc = tl.where(fin, 0.0, t)
            tl.debug_barrier()  # the slot's stores are visible to every thread of the program
            lse = m_i + tl.log2(l_i)
            rseg = tl.load(SEG + rows, mask=rmask, other=S)  # query segment of each row
            i0 = tl.load(SEG + r0)
            il = tl.load(SEG + tl.minimum(r0 + BLOCK_M, L) - 1)
            ob = OUT + bh * S * S
            for s0 in range(0, S, BLOCK_S):
                js = s0 + offs_s
                jmask = js < S
                x = tl.load(scr + js[None, :] * BLOCK_M + offs_m[:, None], mask=rmask[:, None] & jmask[None, :],
                            other=float("-inf"))
                w = tl.exp2(x - lse[:, None])
                for i in range(i0, il + 1):
                    tl.atomic_add(ob + i * S + js, tl.sum(tl.where(rseg[:, None] == i, w, 0.0), 0), mask=jmask,
                                  sem="relaxed")
            tl.debug_barrier()  # the slot is read before the next tile overwrites it


def _programs(device: torch.device, total: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter
        sms = 2
    return max(1, min(total, sms * PROGRAMS_PER_SM))


def block_mass_fused(q: torch.Tensor, k: torch.Tensor, scale: float, starts: torch.Tensor, lens: torch.Tensor,
                     index: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, programs: int | None = None,
                     block_s: int = 64, tables: tuple | None = None) -> torch.Tensor:
    """The fused one-launch path (module doc); ``None`` settings come from :func:`fused_config`, ``programs``
    (persistent programs) from the device's SM count.  ``tables``: ``(seg, ends)`` int32 on ``q``'s device
    (:func:`segment_tables`), to skip building them per call."""
    q, k = _launch_inputs("block_mass_fused", q, k, starts, lens)
    B, H, L, D = q.shape
    dev = q.device
    S = len(lens)
    cfg = fused_config(D, int(lens.min()))
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    opts = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    seg, ends = tables if tables is not None else segment_tables(starts, lens, dev)
    n_rb = triton.cdiv(L, bm)
    total = B * H * n_rb
    nprog = programs or _programs(dev, total)
    scratch = torch.empty(nprog * S * bm, dtype=torch.float32, device=dev)
    out = torch.zeros(B, H, S, S, dtype=torch.float32, device=dev)
    idx = index.to(device=dev, dtype=torch.int32) if index is not None else seg  # unused pointer when None
    _fused_kernel[(nprog,)](q, k, idx, seg, ends, scratch, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                            k.stride(1), k.stride(2), H, L, S, n_rb, total, float(scale) * LOG2E, D=D, BLOCK_M=bm,
                            BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_S=block_s,
                            IEEE=q.dtype == torch.float32, HAS_IDX=index is not None,
                            TWO_SEG=bool(int(lens.min()) >= bn), **opts)
    return out


def _launch_inputs(what: str, q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor):
    """Checked ``q, k`` with unit stride on the head dimension (the kernels load rows of ``D`` contiguous values)."""
    if triton is None:
        raise RuntimeError(f"{what} needs Triton, which is not installed")
    _check(q, k, starts, lens)
    return (q if q.stride(-1) == 1 else q.contiguous()), (k if k.stride(-1) == 1 else k.contiguous())


def segment_tables(starts: torch.Tensor, lens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seg, ends)`` int32 on ``device``: each position's segment, each segment's end (exclusive)."""
    seg = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), lens)
    return seg.to(device), (starts + lens).to(device=device, dtype=torch.int32)


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, scale: float, starts: torch.Tensor, lens: torch.Tensor,
                      index: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                      kernel: str = "twopass", **config) -> torch.Tensor:
    """The Triton path of :func:`block_mass` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``kernel``: ``"fused"`` (:func:`block_mass_fused`, which takes ``config``) or ``"twopass"``."""
    if kernel == "fused":
        return block_mass_fused(q, k, scale, starts, lens, index, **config)
    if kernel != "twopass":
        raise ValueError(f"kernel must be 'fused' or 'twopass', found {kernel!r}")
    q, k = _launch_inputs("block_mass_triton", q, k, starts, lens)
    B, H, L, D = q.shape
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


#: The kernel calibration uses.  ``fused``: GPU tests passed and one observation costs 1.33-2.41x a dense SDPA
#: call at the four production benchmark shapes against ``twopass``'s 2.48-3.85x (H200, 2026-12-07,
#: ``benchmarks/calibration.py --methods mass --kernels fused,twopass``); ``twopass`` stays selectable with
#: ``SiteCalibrator.mass_kernel = "twopass"``.
DEFAULT_MASS_KERNEL = "fused"


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float | None, starts: torch.Tensor, lens: torch.Tensor,
               index: torch.Tensor | None = None, kernel: str = DEFAULT_MASS_KERNEL, tables: tuple | None = None) -> torch.Tensor:
    """``(B, H, S, S)`` float32 segment mass (module doc): Triton on CUDA, the exact torch reduction elsewhere.

    ``index`` (``(L,)``): segments are stated over ``q[:, :, index]`` / ``k[:, :, index]`` (the unit order), read
    in place by the kernel (no permuted copy of ``q`` and ``k``).  ``kernel``: ``"fused"`` or ``"twopass"``
    (CUDA only); ``tables``: :func:`segment_tables` of ``starts, lens`` on ``q``'s device (fused kernel)."""
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.is_cuda and triton is not None:
        if kernel == "fused":
            return block_mass_fused(q, k, scale, starts, lens, index, tables=tables)
        return block_mass_triton(q, k, scale, starts, lens, index, kernel=kernel)
    if index is not None:
        idx = index.to(q.device)
        q, k = q[:, :, idx], k[:, :, idx]
    return block_mass_reference(q, k, scale, starts, lens)
