"""Exact attention of a *subset* of query frames against a *subset* of key frames.

Sequence parallelism needs rectangles of the tile pattern: local query frames against the
key frames a rank holds or fetched, text rows against local frames only, and so on.  This
module computes such a rectangle exactly, returning the output and its log-sum-exp so
partial results merge exactly (:func:`merge`).  Like the op's reference it gathers, per
query frame and group of heads sharing a pattern, only the kept keys: it never builds an
``Lq x Lk`` tensor.  A row with no kept key yields ``out = 0, lse = -inf`` (neutral in the merge).
On CUDA each block uses PyTorch's memory-efficient SDPA kernel (it returns the lse); on CPU
plain matmuls in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attend(q, k, v, scale):
    """Softmax attention of all rows of q against all of k: (out, lse) in the accumulation dtype."""
    acc = _acc(q.dtype)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and not torch.is_grad_enabled():
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
            return out.to(acc), lse[..., : q.shape[-2]].to(acc)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - depends on the GPU build
            pass
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ v.to(acc), lse


def rect_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_frames: Sequence[int] | None,
    k_text: int,
    k_frames: Sequence[int],
    frame_mask: torch.Tensor,
    frame_tokens: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows against keys ``[k_text text tokens] + k_frames x P tokens``.

    Args:
        q: ``(B, H, Lq, D)``; ``q_frames`` lists the global frame of each block of ``P`` query rows,
            or is ``None`` for text rows (they see every key given).
        k, v: ``(B, H, k_text + len(k_frames) * P, D)``.
        frame_mask: boolean ``(H or 1, T, T)`` over *global* frame indices.
    Returns:
        ``out (B, H, Lq, Dv)`` and ``lse (B, H, Lq)`` in float32 (float64 for float64 inputs).
    """
    B, H, Lq, _ = q.shape
    P = frame_tokens
    acc = _acc(q.dtype)
    Lk = k_text + len(k_frames) * P
    if k.shape[2] != Lk or v.shape[2] != Lk:
        raise ValueError(f"rect_attention: keys hold {k.shape[2]} tokens, expected {k_text} text + {len(k_frames)} x {P}")
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=acc, device=q.device)
    if Lq == 0 or Lk == 0:
        return out, lse
    if q_frames is None:
        out[:], lse[:] = _attend(q, k, v, scale)
        return out, lse
    if Lq != len(q_frames) * P:
        raise ValueError(f"rect_attention: {Lq} query rows, expected {len(q_frames)} frames x {P}")
    fm = frame_mask.to("cpu").expand(H, *frame_mask.shape[-2:])
    kf = torch.as_tensor(list(k_frames), dtype=torch.long)
    text_idx = torch.arange(k_text)
    tok = torch.arange(P)
    for i, f in enumerate(q_frames):
        rows = slice(i * P, (i + 1) * P)
        kept = fm[:, f][:, kf] if len(kf) else torch.zeros(H, 0, dtype=torch.bool)
        groups: dict[tuple, list[int]] = {}
        for h in range(H):
            groups.setdefault(tuple(kept[h].tolist()), []).append(h)
        for pattern, heads in groups.items():
            sel = torch.tensor(pattern, dtype=torch.bool).nonzero().flatten()
            idx = torch.cat([text_idx, (k_text + sel[:, None] * P + tok[None, :]).flatten()])
            if idx.numel() == 0:
                continue
            # all heads share the pattern (the usual case): slice, never copy the whole of k/v per frame
            hs = slice(None) if len(heads) == H else torch.tensor(heads, device=q.device)
            ks, vs = (k, v) if len(heads) == H else (k.index_select(1, hs), v.index_select(1, hs))
            if idx.numel() != Lk:
                idx = idx.to(q.device)
                ks, vs = ks.index_select(2, idx), vs.index_select(2, idx)
            o, l = _attend(q[:, hs, rows], ks, vs, scale)
            out[:, hs, rows], lse[:, hs, rows] = o, l
    return out, lse


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of partial attentions over disjoint key sets by log-sum-exp.

    Partials whose lse is ``-inf`` (no keys) contribute nothing.  A row that is ``-inf`` in
    every partial stays ``out = 0, lse = -inf``.
    """
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([l for _, l in parts])
    m = lses.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m_safe)
    denom = w.sum(0)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    out = out / denom.clamp_min(torch.finfo(denom.dtype).tiny)[..., None]
    return out, m_safe + torch.log(denom)
