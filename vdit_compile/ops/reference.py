"""Exact reference implementation of tile attention, for every device.

It gathers, for each query frame, the keys/values of the frames that frame keeps (plus all
text tokens) and runs plain softmax attention on them, so it never builds an ``L x L``
tensor: peak extra memory is ``O(P x L)`` per head group.  It is the CPU implementation of
``torch.ops.vdit.tile_attention`` and the fallback on CUDA when Triton is unavailable; the
tests check it against dense SDPA with the equivalent boolean mask.
"""
from __future__ import annotations

import functools

import torch

from ..layout import TokenLayout


def _row_groups(layout: TokenLayout, frame_mask: torch.Tensor, H: int, device):
    """Yield ``(rows, heads, keys)``: query rows, the heads sharing one key set, their keys.

    ``keys`` is ``None`` when the rows see every key.  This is the whole sparsity rule of
    the reference: text rows see everything; a video query frame sees the text tokens and
    the frames its mask row keeps.
    """
    L, T, P = layout.seq_len, layout.num_frames, layout.frame_tokens
    pre, suf = layout.text_prefix, layout.text_suffix
    if frame_mask.shape[-2:] != (T, T):
        raise ValueError(f"frame mask of shape {tuple(frame_mask.shape)} does not fit {T} frames")
    fmask = frame_mask.to("cpu").expand(H, T, T)
    all_heads = torch.arange(H, device=device)
    for rows in (slice(0, pre), slice(L - suf, L)):
        if rows.stop > rows.start:
            yield rows, all_heads, None
    text_keys = torch.cat([torch.arange(pre), torch.arange(L - suf, L)])
    for f in range(T):
        rows = slice(pre + f * P, pre + (f + 1) * P)
        patterns: dict[tuple, list[int]] = {}
        for h in range(H):
            patterns.setdefault(tuple(fmask[h, f].tolist()), []).append(h)
        for pattern, heads in patterns.items():
            kept = torch.tensor(pattern).nonzero().flatten()
            vid = (pre + kept[:, None] * P + torch.arange(P)[None, :]).flatten()
            keys = torch.cat([text_keys, vid])
            yield rows, torch.tensor(heads, device=device), (None if keys.numel() == L else keys.to(device))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The op's log-sum-exp dtype: float32, or float64 for float64 inputs (exact gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(fn):
    """The reference computes in its accumulation dtype and writes into buffers of that dtype; an enclosing
    ``torch.autocast`` region must not recast its matmuls (a bf16 result into a float32 buffer fails)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@_autocast_off
def reference_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    frame_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tile attention with an arbitrary per-head frame mask.

    Args:
        q, k, v: ``(B, H, L, D)``.
        frame_mask: boolean ``(H or 1, T, T)``; text rows/columns are always kept.
    Returns:
        ``out`` ``(B, H, L, Dv)`` in ``q.dtype`` and ``lse`` ``(B, H, L)`` in float32
        (natural-log log-sum-exp of the scaled scores of each row; float64 for float64 inputs).
    """
    B, H, L, _ = q.shape
    layout.check_seq_len(L)
    acc = _acc_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    out = torch.empty(B, H, L, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(B, H, L, dtype=lse_dtype(q.dtype), device=q.device)
    for rows, heads, keys in _row_groups(layout, frame_mask, H, q.device):
        ks, vs = kf[:, heads], vf[:, heads]
        if keys is not None:
            ks, vs = ks[:, :, keys], vs[:, :, keys]
        s = (qf[:, heads, rows] @ ks.transpose(-1, -2)) * scale
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        out[:, heads, rows] = torch.exp(s - m) @ vs
        lse[:, heads, rows] = m.squeeze(-1).to(lse.dtype)
    return out.to(q.dtype), lse


@_autocast_off
def reference_tile_attention_backward(
    dout, dlse, q, k, v, out, lse, layout: TokenLayout, frame_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``(out, lse)`` w.r.t. ``q, k, v``, gathered the same way as the forward.

    With ``p = softmax(s)``: ``ds = p * (dp - (rowsum(dout * out) - dlse))`` where
    ``dp = dout @ v^T``; the ``dlse`` term makes merged (ring) attention differentiable.
    """
    B, H, L, _ = q.shape
    acc = _acc_dtype(q)
    qf, kf, vf, dof, of = (t.to(acc) for t in (q, k, v, dout, out))
    lsef, dlsef = lse.to(acc), dlse.to(acc)
    delta = (dof * of).sum(-1) - dlsef
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for rows, heads, keys in _row_groups(layout, frame_mask, H, q.device):
        idx = keys if keys is not None else torch.arange(L, device=q.device)
        ks, vs = kf[:, heads][:, :, idx], vf[:, heads][:, :, idx]
        qs, dos = qf[:, heads, rows], dof[:, heads, rows]
        p = torch.exp((qs @ ks.transpose(-1, -2)) * scale - lsef[:, heads, rows, None])
        ds = p * ((dos @ vs.transpose(-1, -2)) - delta[:, heads, rows, None])
        dq[:, heads, rows] += (ds @ ks) * scale
        dk_part, dv_part = dk[:, heads], dv[:, heads]
        dk_part.index_add_(2, idx, (ds.transpose(-1, -2) @ qs) * scale)
        dv_part.index_add_(2, idx, p.transpose(-1, -2) @ dos)
        dk[:, heads], dv[:, heads] = dk_part, dv_part
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dense_masked_attention(q, k, v, layout: TokenLayout, frame_mask: torch.Tensor, scale: float,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense SDPA with the equivalent ``L x L`` boolean mask: the oracle for tests only.

    ``attn_mask`` (boolean, broadcastable to ``(B, H, L, L)``, e.g. a model's text padding) is
    combined with the tile mask by logical and.
    """
    ids = layout.frame_ids(q.device)
    text_q, text_k = ids[:, None] < 0, ids[None, :] < 0
    fm = frame_mask.to(q.device)
    H = q.shape[1]
    fm = fm.expand(H, *fm.shape[-2:])
    qi, ki = ids.clamp(min=0), ids.clamp(min=0)
    tok = (fm[:, qi][:, :, ki] | text_q | text_k)[None]
    if attn_mask is not None:
        tok = tok & attn_mask
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale)
