"""Fast CPU implementation of tile attention: torch's fused CPU attention on the kept key blocks.

Why: the gather reference (:mod:`.reference`) upcasts to float32 and runs unfused matmul +
logsumexp + exp per query frame, so on CPU it is slower than the dense SDPA it replaces even at
low density.  This module computes the same function with torch's fused CPU flash-attention
kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel behind dense SDPA on
CPU, which also returns the log-sum-exp) on only the kept keys, in the input dtype (float32 or
bfloat16; the kernel accumulates in float32), and never builds an ``L x L`` mask.

The work is split into key *segments* whose results are merged by log-sum-exp:

* **text rows** (prefix, suffix) see every key: one call each on views of ``q`` and ``k``.
* **video rows x text keys**: one call for every video row of every head against the text keys
  (a view of ``k``; prefix and suffix are concatenated, a copy of the text keys only).
* **video rows x video keys**, from the plan (:func:`_plan`, built once per mask, head and thread count):

  - **runs**: (head, query frame) pairs whose kept frames are one contiguous range, for
    consecutive query frames whose ranges start ``ds >= 0`` frames apart (a window: ``ds = 1``; rows
    that keep the same range, e.g. global frames or the clamped ends of a band: ``ds = 0``) and
    consecutive heads with equal runs.  Their queries and keys are strided views of ``q`` / ``k``
    (overlapping for windows) that the kernel reads in place: no gather and no copy, with or
    without text (the views start after the text prefix).  ``ds = 0`` runs give each item all their
    rows at once (fewer, larger items), split just enough to keep every thread busy; single-item
    runs of one shape whose starts step evenly share one call (the two clamped ends of a band).
  - **rest**: pairs whose kept frames are not one range (e.g. a global frame plus a window, or a spatial window
    across time in unit space): the query frames of a head that keep the same key frames form one item whose keys
    are gathered once (whole frames, contiguous copies); items of one shape are computed in one call.

  Without text the video segment is the whole result; with text the forward merges the two
  segments by log-sum-exp (``lse = logaddexp(l_v, l_t)``, ``out = o_v e^{l_v - lse} + o_t e^{l_t - lse}``).

The backward needs no merge and no recomputation of the merged statistics: the fused kernel's
explicit backward of one segment, given the *final* ``out`` and ``lse`` of its rows (not the
segment's own), computes ``p = exp(s - lse)`` (the final probabilities of the segment's keys) and
``ds = p * (dp - rowsum(dout * out))`` with the final ``out``, i.e. exactly that segment's share of
the gradient; the query gradients of a row's segments are summed, key/value gradients are summed
over the segments that use a key (float32 accumulators, cast to the input dtype at the end).  The
log-sum-exp gradient ``dlse`` is honoured by one extra head-dim column added once to the inputs:
with ``v' = [v, 1]``, ``out' = [out, 0]``, ``dout' = [dout, dlse]`` the kernel's
``ds = p * (dout' v'^T - rowsum(dout' * out'))`` equals the exact
``p * (dout v^T - rowsum(dout * out) + dlse)`` (see ``reference_tile_attention_backward``); the
column is only added when ``dlse`` is non-zero (sequence parallelism's merged attention).

The reference stays the oracle (tests) and the float64 path.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..layout import TokenLayout
from .threads import serial_bookkeeping

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: dtypes the fused CPU kernel serves here (float64 stays on the exact reference).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _PartialGroup:
    """``G`` items of one fused call: item ``i`` is ``m`` query frames of head ``heads[i]`` that keep the same ``c``
    key frames (their keys are gathered once for all ``m``)."""

    heads: torch.Tensor  # (G,) head of each item
    qframes: torch.Tensor  # (G, m) query frames of each item
    kframes: torch.Tensor  # (G, c) kept key frames of each item
    qflat: torch.Tensor  # (G*m,) rows ``h*T + f`` of each item's query frames in :func:`_frames`, item-major
    kflat: torch.Tensor  # (G*c,) rows of each item's kept key frames in :func:`_frames`


@dataclass(frozen=True)
class _Run:
    """One fused call on strided views (no gather): heads ``h0 .. h0+nh-1``, ``n`` items per head; item ``i``
    is query frames ``[q0 + i*qstep, + qn)`` against key frames ``[k0 + i*kstep, + kn)`` (items' keys overlap
    for windows, ``0 < kstep < kn``, and are the same rows for ``kstep = 0``)."""

    h0: int
    nh: int
    n: int
    q0: int
    qstep: int
    qn: int
    k0: int
    kstep: int
    kn: int


@dataclass(frozen=True)
class _Plan:
    runs: tuple[_Run, ...]  # the pairs whose kept frames are one range, as strided calls ...
    rest: tuple[_PartialGroup, ...]  # ... the others with at least one kept frame, by kept count ...
    empty: torch.Tensor | None  # ... and the (H, T) pairs that keep no frame (None: there are none)


def _groups(fm: torch.Tensor, sel: torch.Tensor, T: int, threads: int = 1) -> tuple[_PartialGroup, ...]:
    """Partial groups of the (head, query frame) pairs selected by ``sel`` (H, T).

    Pairs of one head that keep the same key frames share one item (their keys are gathered once: a spatial
    window across time on 2 x 2-unit frames keeps the same 32 of 64 units for half the query units, whose
    per-pair gathers copied 32x the keys); items with the same number of query and key frames share one call.
    An item is split into query chunks only as far as the call needs to give every thread an item (the fused
    backward parallelises over items).
    """
    sets: dict[tuple, list[int]] = {}
    for h, f in sel.nonzero().tolist():
        sets.setdefault((h, tuple(fm[h, f].nonzero().flatten().tolist())), []).append(f)
    by_shape: dict[tuple[int, int], list[tuple[int, tuple, list[int]]]] = {}
    for (h, kept), frames in sets.items():
        by_shape.setdefault((len(frames), len(kept)), []).append((h, kept, frames))
    out = []
    for (m, c), items in sorted(by_shape.items()):
        n = next((d for d in range(1, m + 1) if m % d == 0 and len(items) * d >= threads), m)  # chunks per item
        hi = torch.tensor([h for h, _, _ in items for _ in range(n)], dtype=torch.long)
        kf = torch.tensor([list(kept) for _, kept, _ in items for _ in range(n)], dtype=torch.long).view(-1, c)
        qf = torch.tensor([fr for _, _, frames in items for fr in frames], dtype=torch.long).view(-1, m // n)
        out.append(_PartialGroup(hi, qf, kf, (hi[:, None] * T + qf).flatten(), (hi[:, None] * T + kf).flatten()))
    return tuple(out)


def _runs(fm: torch.Tensor, threads: int) -> tuple[tuple[_Run, ...], torch.Tensor]:
    """The strided calls covering every pair whose kept frames are one range, and the mask of those pairs.

    Per head, consecutive query frames whose ranges have the same length and starts ``ds >= 0`` apart
    form a run (a window: ``ds > 0``, one item per query frame; rows with the same keys: ``ds = 0``, one
    item with all their rows); heads with equal runs are merged when consecutive; single-item runs of
    the same shape whose query and key starts step evenly become one call (e.g. the two clamped ends
    of a band); a single-item run is split into just enough items (``nh * n >= threads``) to keep every
    thread of the kernel busy.
    """
    H, T, _ = fm.shape
    covered = torch.zeros(H, T, dtype=torch.bool)
    per_head: list[list[list[int]]] = []
    for h in range(H):
        runs: list[list[int]] = []  # [f0, nf, s0, ds, c]
        cur = None
        for f in range(T):
            kept = fm[h, f].nonzero().flatten()
            if kept.numel() == 0 or int(kept[-1]) - int(kept[0]) + 1 != kept.numel():  # empty or not a range
                cur = None
                continue
            s, c = int(kept[0]), kept.numel()
            covered[h, f] = True
            if cur is not None and cur[0] + cur[1] == f and cur[4] == c and (
                    (cur[1] == 1 and s >= cur[2]) or (cur[1] > 1 and s == cur[2] + cur[3] * cur[1])):
                if cur[1] == 1:
                    cur[3] = s - cur[2]
                cur[1] += 1
            else:
                cur = [f, 1, s, 0, c]
                runs.append(cur)
        per_head.append(runs)
    by_run: dict[tuple, list[int]] = {}
    for h, runs in enumerate(per_head):
        for f0, nf, s0, ds, c in runs:
            item = (nf, 1, 1, ds, c) if ds else (1, 0, nf, 0, c)  # (n, qstep, qn, kstep, kn)
            by_run.setdefault((f0, s0) + item, []).append(h)
    calls = []
    for (f0, s0, n, qstep, qn, kstep, kn), heads in by_run.items():
        start = prev = heads[0]
        for h in heads[1:] + [None]:
            if h is not None and h == prev + 1:
                prev = h
                continue
            calls.append(_Run(start, prev - start + 1, n, f0, qstep, qn, s0, kstep, kn))
            if h is not None:
                start = prev = h
    return tuple(_split(c, threads) for c in _chain(calls)), covered


def _chain(calls: list[_Run]) -> list[_Run]:
    """Merge single-item calls of one shape whose query / key starts step evenly (``kstep >= 0``) into one."""
    out, singles = [], {}
    for c in calls:
        if c.n == 1:
            singles.setdefault((c.h0, c.nh, c.qn, c.kn), []).append(c)
        else:
            out.append(c)
    for group in singles.values():
        group.sort(key=lambda c: c.q0)
        cur = group[0]
        for c in group[1:]:
            qstep, kstep = c.q0 - cur.q0, c.k0 - cur.k0
            if cur.n == 1 and kstep >= 0:
                cur = _Run(cur.h0, cur.nh, 2, cur.q0, qstep, cur.qn, cur.k0, kstep, cur.kn)
            elif (c.q0 - cur.q0, c.k0 - cur.k0) == (cur.n * cur.qstep, cur.n * cur.kstep):
                cur = _Run(cur.h0, cur.nh, cur.n + 1, cur.q0, cur.qstep, cur.qn, cur.k0, cur.kstep, cur.kn)
            else:
                out.append(cur)
                cur = c
        out.append(cur)
    return out


def _split(c: _Run, threads: int) -> _Run:
    """A single-item call split in ``n`` (a divisor of its query frames) items, just enough for ``nh * n``
    to reach the thread count (the kernel's backward parallelises over items only)."""
    if c.n > 1 or c.nh >= threads:
        return c
    n = next((d for d in range(1, c.qn + 1) if c.qn % d == 0 and c.nh * d >= threads), c.qn)
    return _Run(c.h0, c.nh, n, c.q0, c.qn // n, c.qn // n, c.k0, 0, c.kn)


@lru_cache(maxsize=64)
def _plan_cached(H: int, T: int, mask_bytes: bytes, threads: int) -> _Plan:
    fm = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).view(H, T, T)
    runs, covered = _runs(fm, threads)
    empty = fm.sum(-1) == 0
    return _Plan(runs, _groups(fm, ~covered & ~empty, T, threads), empty if bool(empty.any()) else None)


def _plan(frame_mask: torch.Tensor, H: int, T: int, threads: int) -> _Plan:
    """The grouping of :func:`fast_attention` for this mask (cached: a model reuses few masks).

    The cache is a bounded per-process LRU (64 entries) keyed by the mask's bits and the thread count; it only holds
    small index tensors on the CPU, no model state.
    """
    if frame_mask.shape[-2:] != (T, T) or frame_mask.dim() != 3 or frame_mask.shape[0] not in (1, H):
        raise ValueError(f"frame mask of shape {tuple(frame_mask.shape)} does not fit {H} heads x {T} frames "
                         f"(expected (1 or {H}, {T}, {T}))")
    fm = frame_mask.to(device="cpu", dtype=torch.bool).expand(H, T, T).contiguous()
    return _plan_cached(H, T, fm.numpy().tobytes(), threads)


@lru_cache(maxsize=64)
def _merge_factor_cached(H: int, T: int, mask_bytes: bytes) -> int:
    fm = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).view(H, T, T)
    for k in sorted((d for d in range(2, T + 1) if T % d == 0), reverse=True):
        blocks = fm.view(H, T // k, k, T // k, k)
        if bool((blocks == blocks[:, :, :1, :, :1]).all()):
            return k
    return 1


def _coarsen(frame_mask: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, TokenLayout]:
    """The same attention on fewer, larger frames where the mask allows it (exact).

    Consecutive frames are contiguous rows, so ``k`` of them are one frame of ``k*P`` tokens whenever the mask is
    constant on its ``k x k`` aligned blocks.  In unit space that is the common case of a window wider than a frame's
    units (a 3D window covering whole frames of 2 x 2 units is a frame band): per-unit items of a few tokens became
    per-frame windows, strided runs of a few calls instead of one call per unit.  The largest such ``k`` wins.
    """
    T = layout.num_frames
    if T < 2 or frame_mask.dim() != 3 or tuple(frame_mask.shape[-2:]) != (T, T):
        return frame_mask, layout  # a mask that does not fit: _plan says so
    H = frame_mask.shape[0]
    fm = frame_mask.to(device="cpu", dtype=torch.bool).contiguous()
    k = _merge_factor_cached(H, T, fm.numpy().tobytes())
    if k == 1:
        return frame_mask, layout
    return (fm[:, ::k, ::k].contiguous(),
            TokenLayout(T // k, layout.frame_tokens * k, 1, layout.text_prefix, layout.text_suffix))


def _frames(x: torch.Tensor, layout: TokenLayout, row0: int | None = None) -> torch.Tensor:
    """``(B, H*T, P*D)``: the video tokens of a ``(B, H, L, D)`` tensor (starting at row ``row0``, by
    default after the text prefix), one row per (head, frame).

    A view of a contiguous tensor without text, else one copy; row ``h*T + f`` holds frame ``f`` of head
    ``h``, so gathers and scatters of whole frames are ``index_select`` / ``index_copy_`` / ``index_add_``
    of contiguous rows (an order of magnitude faster on CPU than advanced indexing over two dimensions).
    """
    B, H, _, D = x.shape
    T, P = layout.num_frames, layout.frame_tokens
    row0 = layout.text_prefix if row0 is None else row0
    return x[:, :, row0:row0 + T * P].reshape(B, H * T, P * D)


def _text(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, H, pre+suf, D)``: the text tokens (prefix then suffix; a view unless both are present)."""
    pre, suf, L = layout.text_prefix, layout.text_suffix, x.shape[2]
    if not suf:
        return x[:, :, :pre]
    return torch.cat([x[:, :, :pre], x[:, :, L - suf:]], dim=2) if pre else x[:, :, L - suf:]


def _text_rows(layout: TokenLayout) -> list[slice]:
    pre, suf, L = layout.text_prefix, layout.text_suffix, layout.seq_len
    return [s for s in (slice(0, pre), slice(L - suf, L)) if s.stop > s.start]


def _view(x: torch.Tensor, b: int, h0: int, nh: int, row0: int, n: int, step: int, rows: int) -> torch.Tensor:
    """``(nh, n, rows, Dh)`` strided view of batch row ``b``, heads ``h0 ..`` of a 4-D ``(B, H, L, Dh)``
    tensor: item ``i`` is rows ``row0 + i*step .. + rows`` (items overlap when ``step < rows``)."""
    st = x.stride()
    return x.as_strided((nh, n, rows, x.shape[3]), (st[1], step * st[2], st[2], st[3]),
                        x.storage_offset() + b * st[0] + h0 * st[1] + row0 * st[2])


def _items(x: torch.Tensor, b: int, r: _Run, P: int, row0: int, keys: bool = False) -> torch.Tensor:
    """The ``(nh, n, rows, Dh)`` query (or key) rows of a run's items in ``x``, whose video starts at ``row0``."""
    if keys:
        return _view(x, b, r.h0, r.nh, row0 + r.k0 * P, r.n, r.kstep * P, r.kn * P)
    return _view(x, b, r.h0, r.nh, row0 + r.q0 * P, r.n, r.qstep * P, r.qn * P)


def _check(q, k, v, layout: TokenLayout) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"fast_attention expects q, k, v of shape (B, H, L, D) with equal B, H, L; found "
                         f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}")
    if q.device.type != "cpu" or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fast_attention runs on CPU tensors of dtype {SUPPORTED_DTYPES}; found {q.dtype} on {q.device}")
    layout.check_seq_len(q.shape[2])


def _unit_stride(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel reads any strides but a contiguous head dim; copy only tensors without one."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def fast_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, frame_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile attention on CPU; same contract as :func:`~.reference.reference_tile_attention`.

    Returns ``out`` ``(B, H, L, Dv)`` in ``q.dtype`` and ``lse`` ``(B, H, L)`` float32.
    """
    _check(q, k, v, layout)
    with serial_bookkeeping() as par:
        frame_mask, layout = _coarsen(frame_mask, layout)
        return _forward(q, k, v, layout, frame_mask, scale, par)


def _forward(q, k, v, layout: TokenLayout, frame_mask: torch.Tensor, scale: float, par):
    q, k, v = _unit_stride(q, k, v)
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    T, P = layout.num_frames, layout.frame_tokens
    pre, suf = layout.text_prefix, layout.text_suffix
    plan = _plan(frame_mask, H, T, par.threads)
    out = q.new_empty(B, H, L, Dv)
    lse = torch.empty(B, H, L, dtype=torch.float32)
    for rs in _text_rows(layout):  # text rows see every key
        o, l = par(_FLASH, q[:, :, rs], k, v, scale=scale)
        out[:, :, rs] = o
        lse[:, :, rs] = l
    # the video rows' attention over the video keys: into out / lse directly without text, else into workspaces
    if pre + suf:
        out_v, lse_v = q.new_empty(B, H, T * P, Dv), torch.empty(B, H, T * P, dtype=torch.float32)
    else:
        out_v, lse_v = out, lse
    lse_v4 = lse_v[..., None]
    for b in range(B):
        for r in plan.runs:
            o, l = par(_FLASH, _items(q, b, r, P, pre), _items(k, b, r, P, pre, keys=True),
                       _items(v, b, r, P, pre, keys=True), scale=scale)
            _items(out_v, b, r, P, 0).copy_(o)
            _items(lse_v4, b, r, P, 0)[..., 0].copy_(l)
    if plan.rest:
        qf, kf, vf = _frames(q, layout), _frames(k, layout), _frames(v, layout)
        of, lf = _frames(out_v, layout, 0), _frames(lse_v4, layout, 0)  # views of the contiguous workspaces
        for g in plan.rest:
            G, m = g.qframes.shape
            o, l = par(_FLASH, qf.index_select(1, g.qflat).view(B, G, m * P, D),
                       kf.index_select(1, g.kflat).view(B, G, -1, D), vf.index_select(1, g.kflat).view(B, G, -1, Dv),
                       scale=scale)
            of.index_copy_(1, g.qflat, o.contiguous().view(B, G * m, P * Dv))
            lf.index_copy_(1, g.qflat, l.contiguous().view(B, G * m, P))
    if plan.empty is not None:  # rows that keep no frame: nothing from the video keys
        rows = plan.empty.repeat_interleave(P, dim=1)
        out_v.masked_fill_(rows[None, :, :, None], 0)
        lse_v.masked_fill_(rows[None], float("-inf"))
    if not pre + suf:
        return out, lse
    o_t, l_t = par(_FLASH, q[:, :, pre:L - suf], _text(k, layout), _text(v, layout), scale=scale)
    l_all = torch.logaddexp(lse_v, l_t)
    merged = out_v.float().mul_((lse_v - l_all).exp_()[..., None])
    merged.addcmul_(o_t, (l_t - l_all).exp_()[..., None])
    out[:, :, pre:L - suf] = merged
    lse[:, :, pre:L - suf] = l_all
    return out, lse


def fast_attention_backward(
    dout, dlse, q, k, v, out, lse, layout: TokenLayout, frame_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``(out, lse)`` w.r.t. ``q, k, v``; same contract as the reference backward.

    Every segment of the forward runs the fused backward with the final ``out`` / ``lse`` of its rows
    (module doc); gradients are summed in float32 and cast to the input dtype at the end.
    """
    _check(q, k, v, layout)
    with serial_bookkeeping() as par:
        frame_mask, layout = _coarsen(frame_mask, layout)
        return _backward(dout, dlse, q, k, v, out, lse, layout, frame_mask, scale, par)


def _backward(dout, dlse, q, k, v, out, lse, layout: TokenLayout, frame_mask: torch.Tensor, scale: float, par):
    B, H, L, D = q.shape
    T, P = layout.num_frames, layout.frame_tokens
    pre, suf = layout.text_prefix, layout.text_suffix
    plan = _plan(frame_mask, H, T, par.threads)
    dtype = q.dtype
    lse = lse.float()
    if dlse is not None and bool(dlse.any()):  # one extra column (module doc), stripped from the gradients at the end
        q, k, out = (torch.cat([x, x.new_zeros(x.shape[:-1] + (1,))], -1) for x in (q, k, out))
        v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)
        dout = torch.cat([dout, dlse.to(dout.dtype)[..., None]], -1)
        cut = True
    else:
        cut = False
    q, k, v, out, dout = _unit_stride(q, k, v, out, dout)
    Dq, Dw = q.shape[-1], v.shape[-1]
    lse4 = lse[..., None]
    f32 = torch.float32
    # query rows get their first gradient by assignment: the text rows and, with text, the video rows from the
    # text keys; without text from their one video segment (a run, a rest group, or zero for empty pairs)
    dq = torch.empty(B, H, L, Dq, dtype=f32)
    dk = torch.zeros(B, H, L, Dq, dtype=f32)
    dv = torch.zeros(B, H, L, Dw, dtype=f32)
    for rs in _text_rows(layout):  # text rows x every key
        gq, gk, gv = par(_FLASH_BWD, dout[:, :, rs], q[:, :, rs], k, v, out[:, :, rs], lse[:, :, rs], 0.0, False,
                                scale=scale)
        dq[:, :, rs] = gq
        dk += gk
        dv += gv
    if pre + suf:  # video rows x text keys
        vid = slice(pre, L - suf)
        gq, gk, gv = par(_FLASH_BWD, dout[:, :, vid], q[:, :, vid], _text(k, layout), _text(v, layout), out[:, :, vid],
                                lse[:, :, vid], 0.0, False, scale=scale)
        dq[:, :, vid] = gq
        for d, g in ((dk, gk), (dv, gv)):
            d[:, :, :pre] += g[:, :, :pre]
            d[:, :, L - suf:] += g[:, :, pre:]
    for b in range(B):  # video rows x video keys: the runs
        for r in plan.runs:
            gq, gk, gv = par(_FLASH_BWD, _items(dout, b, r, P, pre), _items(q, b, r, P, pre),
                             _items(k, b, r, P, pre, keys=True), _items(v, b, r, P, pre, keys=True),
                             _items(out, b, r, P, pre), _items(lse4, b, r, P, pre)[..., 0], 0.0, False, scale=scale)
            if pre + suf:
                _items(dq, b, r, P, pre).add_(gq)
            else:
                _items(dq, b, r, P, pre).copy_(gq)
            for d, g in ((dk, gk), (dv, gv)):
                if r.kstep == 0:  # every item's keys are the same rows
                    _view(d, b, r.h0, r.nh, pre + r.k0 * P, 1, 0, r.kn * P)[:, 0].add_(g[:, 0] if r.n == 1 else g.sum(1))
                    continue
                step = min(r.kstep, r.kn)  # key frames [j0, j0 + step) of the items are distinct frames
                for j0 in range(0, r.kn, step):
                    j1 = min(j0 + step, r.kn)
                    _view(d, b, r.h0, r.nh, pre + (r.k0 + j0) * P, r.n, r.kstep * P, (j1 - j0) * P).add_(
                        g[:, :, j0 * P:j1 * P])
    if plan.rest:  # video rows x video keys: the gathered groups
        qf, kf, vf, of, dof = (_frames(x, layout) for x in (q, k, v, out, dout))
        lf = _frames(lse4, layout)
        dqf, dkf, dvf = (_frames(x, layout) for x in (dq, dk, dv))
        for g in plan.rest:
            G, c = g.kframes.shape
            m = g.qframes.shape[1]

            def rows(x, g=g, G=G, m=m):
                return x.index_select(1, g.qflat).view(B, G, m * P, -1)

            gq, gk, gv = par(_FLASH_BWD, rows(dof), rows(qf), kf.index_select(1, g.kflat).view(B, G, c * P, Dq),
                                    vf.index_select(1, g.kflat).view(B, G, c * P, Dw), rows(of), rows(lf)[..., 0],
                                    0.0, False, scale=scale)
            gq = gq.reshape(B, G * m, P * Dq).float()
            if pre + suf:
                dqf.index_add_(1, g.qflat, gq)
            else:
                dqf.index_copy_(1, g.qflat, gq)
            for d, grad in ((dkf, gk), (dvf, gv)):
                grad = grad.float().unflatten(2, (c, P))
                for j in range(c):
                    d.index_add_(1, g.heads * T + g.kframes[:, j], grad[:, :, j].reshape(B, G, -1))
        if pre + suf:  # the frame workspaces were copies: write them back
            for d, f in ((dq, dqf), (dk, dkf), (dv, dvf)):
                d[:, :, pre:L - suf] = f.view(B, H, T * P, -1)
    if plan.empty is not None and not pre + suf:  # rows that keep nothing (and no text): zero gradient
        dq.masked_fill_(plan.empty.repeat_interleave(P, dim=1)[None, :, :, None], 0)
    if cut:
        dq, dk, dv = dq[..., :-1], dk[..., :-1], dv[..., :-1]
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def fast_applies(q: torch.Tensor) -> bool:
    """True where this module runs (CPU float32/bfloat16/float16); float64 stays on the exact reference."""
    return q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES
