"""Fast CPU implementation of tile attention: torch's fused CPU attention on gathered key blocks.

Why: the gather reference (:mod:`.reference`) upcasts to float32 and runs unfused matmul +
logsumexp + exp per query frame, so on CPU it is slower than the dense SDPA it replaces even at
low density.  This module computes the same function with torch's fused CPU flash-attention
kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel behind dense SDPA on
CPU, which also returns the log-sum-exp) on only the kept keys, in the input dtype (float32 or
bfloat16; the kernel accumulates in float32), and never builds an ``L x L`` mask.

How the work is batched (the "plan", built once per mask and head count, see :func:`_plan`):

* **full rows**: text rows, the rows of frames that keep every frame (the global frames of a
  ``TileMask``) and every row of a dense head see all keys.  Heads with the same set of such
  frames form one call on ``k[:, heads]`` directly (no key gather).
* **partial rows**: every (head, query frame) whose row keeps ``c < T`` frames.  All such pairs
  with the same ``c`` are stacked along the batch-of-heads axis: their ``c`` kept key frames are
  gathered once (whole frames, contiguous copies) behind the text keys, and one fused call
  computes all of them.
* **runs** (forward, layouts without text): pairs whose kept frames are one contiguous range, for
  consecutive query frames starting 0 or 1 frame apart (a window), need no gather at all: their
  keys are an overlapping strided view of ``k`` that the kernel reads in place.

The backward calls the fused kernel's explicit backward on the same gathered blocks (no
autograd graph, no recomputation beyond the gather) and scatters the key/value gradients back
with ``index_add_`` into float32 accumulators.  The log-sum-exp gradient ``dlse`` is honoured
by one extra head-dim column: with ``v' = [v, 1]``, ``out' = [out, 0]``, ``dout' = [dout, dlse]``
the kernel's ``ds = p * (dout' v'^T - rowsum(dout' * out'))`` equals the exact
``p * (dout v^T - rowsum(dout * out) + dlse)`` (see ``reference_tile_attention_backward``); the
column is only added when ``dlse`` is non-zero (sequence parallelism's merged attention).

The reference stays the oracle (tests) and the float64 path.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..layout import TokenLayout

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: dtypes the fused CPU kernel serves here (float64 stays on the exact reference).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _FullGroup:
    heads: torch.Tensor | None  # (G,) head indices, None = every head in order
    frames: torch.Tensor  # (n,) query frames whose rows keep every frame (text rows always included)
    all_frames: bool  # frames == arange(T): the group's rows are every row


@dataclass(frozen=True)
class _PartialGroup:
    heads: torch.Tensor  # (G,) head of each (head, query frame) pair
    qframes: torch.Tensor  # (G,) query frame of each pair
    kframes: torch.Tensor  # (G, c) kept key frames of each pair
    qflat: torch.Tensor  # (G,) row ``h*T + f`` of each pair's query frame in :func:`_frames`
    kflat: torch.Tensor  # (G*c,) rows of each pair's kept key frames in :func:`_frames`


@dataclass(frozen=True)
class _Run:
    """Query frames ``f0 .. f0+nf-1`` of heads ``h0 .. h0+nh-1`` whose kept frames are the contiguous
    ranges ``[s0 + ds*i, s0 + ds*i + c)`` (``ds`` 0 or 1): without text their keys are a strided view
    of ``k`` (no gather at all)."""

    h0: int
    nh: int
    f0: int
    nf: int
    s0: int
    ds: int
    c: int


@dataclass(frozen=True)
class _Plan:
    full: tuple[_FullGroup, ...]
    partial: tuple[_PartialGroup, ...]  # every partial pair (layouts with text)
    runs: tuple[_Run, ...]  # the pairs whose kept frames are a range (layouts without text) ...
    rest: tuple[_PartialGroup, ...]  # ... and the others


def _groups(fm: torch.Tensor, sel: torch.Tensor, T: int) -> tuple[_PartialGroup, ...]:
    """Partial groups of the (head, query frame) pairs selected by ``sel`` (H, T), by kept count."""
    counts = fm.sum(-1)
    out = []
    for c in sorted(set(counts[sel].tolist())):
        hi, fi = ((counts == c) & sel).nonzero(as_tuple=True)
        kf = fm[hi, fi].nonzero()[:, 1].view(-1, c)  # row-major: each pair's kept frames in order
        out.append(_PartialGroup(hi, fi, kf, hi * T + fi, (hi[:, None] * T + kf).flatten()))
    return tuple(out)


def _runs(fm: torch.Tensor, partial: torch.Tensor) -> tuple[tuple[_Run, ...], torch.Tensor]:
    """Runs of range pairs (merged over consecutive heads with equal runs) and the mask of pairs they cover."""
    H, T, _ = fm.shape
    covered = torch.zeros(H, T, dtype=torch.bool)
    per_key: dict[tuple, list[int]] = {}
    for h in range(H):
        cur = None  # [f0, nf, s0, ds, c]
        for f in range(T):
            if not partial[h, f]:
                cur = None
                continue
            kept = fm[h, f].nonzero().flatten()
            s, c = int(kept[0]), kept.numel()
            if int(kept[-1]) - s + 1 != c:  # not a contiguous range
                cur = None
                continue
            covered[h, f] = True
            if cur is not None and cur[0] + cur[1] == f and cur[4] == c and (
                    (cur[1] == 1 and s - cur[2] in (0, 1)) or (cur[1] > 1 and s == cur[2] + cur[3] * cur[1])):
                if cur[1] == 1:
                    cur[3] = s - cur[2]
                cur[1] += 1
            else:
                cur = [f, 1, s, 0, c]
                per_key.setdefault(("h", h), []).append(cur)
        for r in per_key.get(("h", h), []):
            per_key.setdefault(tuple(r), []).append(h)
    runs = []
    for key, heads in per_key.items():
        if key[0] == "h":
            continue
        start = prev = heads[0]
        for h in heads[1:] + [None]:
            if h is not None and h == prev + 1:
                prev = h
                continue
            runs.append(_Run(start, prev - start + 1, *key))
            if h is not None:
                start = prev = h
    return tuple(runs), covered


@lru_cache(maxsize=64)
def _plan_cached(H: int, T: int, mask_bytes: bytes) -> _Plan:
    fm = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).view(H, T, T)
    full_rows = fm.all(-1)  # (H, T)
    by_set: dict[tuple, list[int]] = {}
    for h in range(H):
        by_set.setdefault(tuple(full_rows[h].nonzero().flatten().tolist()), []).append(h)
    full = []
    for frames, heads in by_set.items():
        hs = None if len(heads) == H else torch.tensor(heads)
        full.append(_FullGroup(hs, torch.tensor(frames, dtype=torch.long), len(frames) == T))
    runs, covered = _runs(fm, ~full_rows)
    return _Plan(tuple(full), _groups(fm, ~full_rows, T), runs, _groups(fm, ~full_rows & ~covered, T))


def _plan(frame_mask: torch.Tensor, H: int, T: int) -> _Plan:
    """The grouping of :func:`fast_attention` for this mask (cached: a model reuses few masks).

    The cache is a bounded per-process LRU (64 entries) keyed by the mask's bits; it only holds
    small index tensors on the CPU, no model state.
    """
    if frame_mask.shape[-2:] != (T, T) or frame_mask.dim() != 3 or frame_mask.shape[0] not in (1, H):
        raise ValueError(f"frame mask of shape {tuple(frame_mask.shape)} does not fit {H} heads x {T} frames "
                         f"(expected (1 or {H}, {T}, {T}))")
    fm = frame_mask.to(device="cpu", dtype=torch.bool).expand(H, T, T).contiguous()
    return _plan_cached(H, T, bytes(fm.flatten().to(torch.uint8).tolist()))


def _frames(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, H*T, P*D)``: the video tokens of a ``(B, H, L, D)`` tensor, one row per (head, frame).

    A view without text, else one copy; row ``h*T + f`` holds frame ``f`` of head ``h``, so gathers and
    scatters of whole frames are ``index_select`` / ``index_copy_`` / ``index_add_`` of contiguous rows
    (an order of magnitude faster on CPU than advanced indexing over two dimensions).
    """
    B, H, L, D = x.shape
    T, P = layout.num_frames, layout.frame_tokens
    return x[:, :, layout.text_prefix:L - layout.text_suffix].reshape(B, H * T, P * D)


def _text(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, H, pre+suf, D)``: the text tokens (prefix then suffix)."""
    pre, suf, L = layout.text_prefix, layout.text_suffix, x.shape[2]
    if not suf:
        return x[:, :, :pre]
    return torch.cat([x[:, :, :pre], x[:, :, L - suf:]], dim=2) if pre else x[:, :, L - suf:]


def _full_rows(layout: TokenLayout, g: _FullGroup) -> torch.Tensor | None:
    """Token rows of a full group (text + its frames' rows), ``None`` for every row."""
    if g.all_frames:
        return None
    pre, suf, P = layout.text_prefix, layout.text_suffix, layout.frame_tokens
    L = layout.seq_len
    vid = (pre + g.frames[:, None] * P + torch.arange(P)[None, :]).flatten()
    return torch.cat([torch.arange(pre), vid, torch.arange(L - suf, L)])


def _take(x: torch.Tensor, heads: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    if heads is not None:
        x = x.index_select(1, heads)
    if rows is not None:
        x = x.index_select(2, rows)
    return x


def _put(dst: torch.Tensor, heads: torch.Tensor | None, rows: torch.Tensor | None, src: torch.Tensor) -> None:
    if heads is None and rows is None:
        dst.copy_(src)
    elif rows is None:
        dst[:, heads] = src
    elif heads is None:
        dst[:, :, rows] = src
    else:
        dst[:, heads[:, None], rows[None, :]] = src


def _gather_keys(text: torch.Tensor, frames: torch.Tensor, g: _PartialGroup, T: int, Dh: int) -> torch.Tensor:
    """``(B, G, text + c*P, Dh)``: each pair's text keys, then its kept frames' keys."""
    B = frames.shape[0]
    G = g.heads.shape[0]
    kept = frames.index_select(1, g.kflat).view(B, G, -1, Dh)  # (B, G, c*P, Dh)
    if text.shape[2] == 0:
        return kept
    return torch.cat([text.index_select(1, g.heads), kept], dim=2)


def _check(q, k, v, layout: TokenLayout) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"fast_attention expects q, k, v of shape (B, H, L, D) with equal B, H, L; found "
                         f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}")
    if q.device.type != "cpu" or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fast_attention runs on CPU tensors of dtype {SUPPORTED_DTYPES}; found {q.dtype} on {q.device}")
    layout.check_seq_len(q.shape[2])


def fast_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, frame_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile attention on CPU; same contract as :func:`~.reference.reference_tile_attention`.

    Returns ``out`` ``(B, H, L, Dv)`` in ``q.dtype`` and ``lse`` ``(B, H, L)`` float32.
    """
    _check(q, k, v, layout)
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    T, P = layout.num_frames, layout.frame_tokens
    plan = _plan(frame_mask, H, T)
    out = q.new_empty(B, H, L, Dv)
    lse = torch.empty(B, H, L, dtype=torch.float32)
    for g in plan.full:
        rows = _full_rows(layout, g)
        if rows is not None and rows.numel() == 0:
            continue  # no text and no full frame (the kernel divides by the row count)
        o, l = _FLASH(_take(q, g.heads, rows), _take(k, g.heads, None), _take(v, g.heads, None), scale=scale)
        _put(out, g.heads, rows, o)
        _put(lse, g.heads, rows, l)
    groups, runs = (plan.partial, ()) if layout.text_prefix + layout.text_suffix else (plan.rest, plan.runs)
    if runs:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    for b in range(B) if runs else ():
        for r in runs:
            o, l = _FLASH(_run_view(q, b, r, P), _run_view(k, b, r, P, keys=True), _run_view(v, b, r, P, keys=True),
                          scale=scale)
            _run_view(out, b, r, P).copy_(o)
            _run_view(lse, b, r, P).copy_(l)
    if not groups:
        return out, lse
    qf, kf, vf = _frames(q, layout), _frames(k, layout), _frames(v, layout)
    kt, vt = _text(k, layout), _text(v, layout)
    of, lf = _frames(out, layout), _frames(lse[..., None], layout)  # copies when there is text: written back below
    for g in groups:
        G = g.heads.shape[0]
        o, l = _FLASH(qf.index_select(1, g.qflat).view(B, G, P, D), _gather_keys(kt, kf, g, T, D),
                      _gather_keys(vt, vf, g, T, Dv), scale=scale)
        of.index_copy_(1, g.qflat, o.contiguous().view(B, G, P * Dv))
        lf.index_copy_(1, g.qflat, l.contiguous())
    _unframe(out, of, layout)
    _unframe(lse[..., None], lf, layout)
    return out, lse


def _run_view(x: torch.Tensor, b: int, r: _Run, P: int, keys: bool = False) -> torch.Tensor:
    """Strided view of batch row ``b`` of a contiguous ``(B, H, L[, Dh])`` tensor (layout without text):
    the run's query rows ``(nh, nf, P[, Dh])``, or with ``keys`` its key rows ``(nh, nf, c*P, Dh)``
    (overlapping windows: consecutive query frames start ``ds`` frames apart)."""
    Dh = x.shape[3] if x.dim() == 4 else 1
    off = x.storage_offset() + b * x.stride(0) + r.h0 * x.stride(1)
    if keys:
        size, stride, off = (r.nh, r.nf, r.c * P), (x.stride(1), r.ds * P * Dh, Dh), off + r.s0 * P * Dh
    else:
        size, stride, off = (r.nh, r.nf, P), (x.stride(1), P * Dh, Dh), off + r.f0 * P * Dh
    if x.dim() == 4:
        size, stride = size + (Dh,), stride + (1,)
    return x.as_strided(size, stride, off)


def _unframe(dst: torch.Tensor, framed: torch.Tensor, layout: TokenLayout) -> None:
    """Write a :func:`_frames` workspace back into ``dst``'s video rows (no-op when it is a view of them)."""
    B, H, L, Dh = dst.shape
    vid = dst[:, :, layout.text_prefix:L - layout.text_suffix]
    if framed.data_ptr() != vid.data_ptr() or not vid.is_contiguous():
        vid.copy_(framed.view(B, H, -1, Dh))


def _flash_backward(dout, dlse, q, k, v, out, lse, scale):
    """Gradients of one fused call; ``dlse`` (or ``None``) through the extra column (module doc)."""
    if dlse is not None:  # one extra column: q' = [q, 0], k' = [k, 0], v' = [v, 1], out' = [out, 0], dout' = [dout, dlse]
        q, k, out = (torch.cat([x, torch.zeros_like(x[..., :1])], -1) for x in (q, k, out))
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        dout = torch.cat([dout, dlse[..., None].to(dout.dtype)], -1)
    dq, dk, dv = _FLASH_BWD(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                            lse.contiguous(), 0.0, False, scale=scale)
    if dlse is not None:
        dq, dk, dv = dq[..., :-1], dk[..., :-1], dv[..., :-1]
    return dq, dk, dv


def fast_attention_backward(
    dout, dlse, q, k, v, out, lse, layout: TokenLayout, frame_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``(out, lse)`` w.r.t. ``q, k, v``; same contract as the reference backward.

    Query gradients are written once per row; key/value gradients are summed over the groups that
    use a key, in float32, and cast to the input dtype at the end.  The fused kernel returns its
    gradients token-major (memory ``(B, keys, G, D)``), so the accumulators are token-major too
    (``(B, P, H*T, D)``: row ``h*T + f`` of every token slot) and take them without a copy.
    """
    _check(q, k, v, layout)
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    T, P = layout.num_frames, layout.frame_tokens
    pre, suf = layout.text_prefix, layout.text_suffix
    ntext = pre + suf
    plan = _plan(frame_mask, H, T)
    lse = lse.float()
    use_dlse = dlse is not None and bool(dlse.any())
    acc = {"k": (torch.zeros(B, ntext, H, D), torch.zeros(B, P, H * T, D)),
           "v": (torch.zeros(B, ntext, H, Dv), torch.zeros(B, P, H * T, Dv))}
    dq = torch.empty_like(q)
    # the gathered groups, not the strided runs: the fused backward is slower on the runs' overlapping
    # views (they are made contiguous) than on one gathered call per kept count (measured, 2 threads)
    groups = plan.partial
    if groups:
        qf, kf, vf, of, dof = (_frames(x, layout) for x in (q, k, v, out, dout))
        lf = _frames(lse[..., None], layout)
        dlf = _frames(dlse.float()[..., None], layout) if use_dlse else None
        kt, vt = _text(k, layout), _text(v, layout)
        dq_tok = q.new_empty(B, P, H * T, D)  # token-major query gradients of the partial rows
        for g in groups:
            G, c = g.kframes.shape

            def rows(x, Dh, g=g, G=G):
                return x.index_select(1, g.qflat).view(B, G, P, Dh)

            dq_g, dk_g, dv_g = _flash_backward(rows(dof, Dv), rows(dlf, 1)[..., 0] if use_dlse else None, rows(qf, D),
                                               _gather_keys(kt, kf, g, T, D), _gather_keys(vt, vf, g, T, Dv),
                                               rows(of, Dv), rows(lf, 1)[..., 0], scale)
            dq_tok.index_copy_(2, g.qflat, _token_major(dq_g))
            for name, grad in (("k", dk_g), ("v", dv_g)):
                acc_text, acc_vid = acc[name]
                tm = _token_major(grad)  # (B, ntext + c*P, G, Dh)
                if ntext:
                    acc_text.index_add_(2, g.heads, tm[:, :ntext].float())
                vid = tm[:, ntext:].unflatten(1, (c, P))
                for j in range(c):
                    acc_vid.index_add_(2, g.heads * T + g.kframes[:, j], vid[:, j].float())
        # every partial row once; full rows (below) overwrite the rest
        dq[:, :, pre:L - suf].view(B, H, T, P, D).copy_(dq_tok.view(B, P, H, T, D).permute(0, 2, 3, 1, 4))
    all_heads = torch.arange(H)
    for g in plan.full:
        rows = _full_rows(layout, g)
        if rows is not None and rows.numel() == 0:
            continue
        dlse_g = _take(dlse, g.heads, rows) if use_dlse else None
        dq_g, dk_g, dv_g = _flash_backward(_take(dout, g.heads, rows), dlse_g, _take(q, g.heads, rows),
                                           _take(k, g.heads, None), _take(v, g.heads, None),
                                           _take(out, g.heads, rows), _take(lse, g.heads, rows), scale)
        _put(dq, g.heads, rows, dq_g)
        idx = g.heads if g.heads is not None else all_heads
        for name, grad in (("k", dk_g), ("v", dv_g)):
            acc_text, acc_vid = acc[name]
            tm = _token_major(grad)  # (B, L, G, Dh)
            if ntext:
                acc_text.index_add_(2, idx, torch.cat([tm[:, :pre], tm[:, L - suf:]], 1).float())
            vid = tm[:, pre:L - suf].unflatten(1, (T, P))
            for f in range(T):
                acc_vid.index_add_(2, idx * T + f, vid[:, f].float())

    def assemble(like, acc_text, acc_vid):
        Dh = like.shape[-1]
        grad = torch.empty_like(like)
        grad[:, :, pre:L - suf].view(B, H, T, P, Dh).copy_(acc_vid.view(B, P, H, T, Dh).permute(0, 2, 3, 1, 4))
        if pre:
            grad[:, :, :pre] = acc_text[:, :pre].transpose(1, 2)
        if suf:
            grad[:, :, L - suf:] = acc_text[:, pre:].transpose(1, 2)
        return grad

    return dq, assemble(k, *acc["k"]), assemble(v, *acc["v"])


def _token_major(grad: torch.Tensor) -> torch.Tensor:
    """``(B, G, N, Dh)`` -> ``(B, N, G, Dh)``, contiguous (free for the fused kernel's own layout)."""
    return grad.transpose(1, 2).contiguous()


def fast_applies(q: torch.Tensor) -> bool:
    """True where this module runs (CPU float32/bfloat16/float16); float64 stays on the exact reference."""
    return q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES
