"""``vdit::tile_attention`` written with plain ATen ops, for backends that have no converter for the op.

Same exact "band" algorithm as the ONNX translation (:mod:`.onnx_attention`): per head group with
mask ``(g, w)``, text queries and global-frame queries attend to every key; every other query frame
attends to the text keys, the global keys and a gathered band of ``2w+1`` frames with a ``-inf``
bias on band frames outside ``[g, T)``.  Only ``index``/``cat``/``matmul``/``logsumexp``/``exp``
are used, so TensorRT (through torch-tensorrt's dynamo converters) can build it without a plugin,
and no ``L x L`` tensor is formed for a sparse head group.  Installed with
:func:`decompose_tile_attention` (``ExportedProgram.run_decompositions``).
"""
from __future__ import annotations

import torch

from ..masks.tile import DENSE


def _groups(global_frames, windows, H: int, T) -> dict:
    gs, ws = list(global_frames), list(windows)
    if len(gs) == 1:
        gs, ws = gs * H, ws * H
    groups: dict = {}
    for h, (g, w) in enumerate(zip(gs, ws)):
        dense = g == DENSE or (isinstance(T, int) and (g >= T or w >= T - 1))
        groups.setdefault("dense" if dense else (int(g), int(w)), []).append(h)
    return groups


def _attend(s: torch.Tensor):
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def _dense(q, k, v, scale):
    p, lse = _attend((q @ k.transpose(-1, -2)) * scale)
    return p @ v, lse


def _sparse(q, k, v, pre: int, suf: int, T, g: int, w: int, scale: float):
    B, H, L, D = q.shape
    P = (L - pre - suf) // T
    head = pre + g * P
    full_q = torch.cat([q[:, :, :head], q[:, :, L - suf:]], dim=2)
    full_out, full_lse = _dense(full_q, k, v, scale)

    def frames(x):
        return x[:, :, pre:L - suf].reshape(B, H, T, P, x.shape[-1])

    kv, vv = frames(k), frames(v)
    q_rest = frames(q)[:, :, g:]
    j = torch.arange(g, T, device=q.device)[:, None] + torch.arange(-w, w + 1, device=q.device)[None, :]
    keep = (j >= g) & (j < T)
    idx = j.clamp(0, T - 1)
    band_k = kv[:, :, idx].reshape(B, H, T - g, (2 * w + 1) * P, D)
    band_v = vv[:, :, idx].reshape(B, H, T - g, (2 * w + 1) * P, v.shape[-1])
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    bias = torch.where(keep, zero, torch.full_like(zero, float("-inf"))).repeat_interleave(P, dim=1)
    keys, vals = [], []
    if pre or suf:
        keys.append(torch.cat([k[:, :, :pre], k[:, :, L - suf:]], dim=2).unsqueeze(2))
        vals.append(torch.cat([v[:, :, :pre], v[:, :, L - suf:]], dim=2).unsqueeze(2))
    if g:
        keys.append(kv.reshape(B, H, T * P, D)[:, :, : g * P].unsqueeze(2))
        vals.append(vv.reshape(B, H, T * P, v.shape[-1])[:, :, : g * P].unsqueeze(2))
    scores = [q_rest @ kk.transpose(-1, -2) * scale for kk in keys]
    scores.append(q_rest @ band_k.transpose(-1, -2) * scale + bias[:, None, :])
    p, lse = _attend(torch.cat(scores, dim=-1))
    out, start = 0, 0
    for vals_i in vals + [band_v]:
        width = vals_i.shape[-2] if vals_i is not band_v else p.shape[-1] - start
        out = out + p[..., start:start + width] @ vals_i
        start += width
    out = out.reshape(B, H, (T - g) * P, v.shape[-1])
    lse = lse.reshape(B, H, (T - g) * P)
    return (torch.cat([full_out[:, :, :head], out, full_out[:, :, head:]], dim=2),
            torch.cat([full_lse[:, :, :head], lse, full_lse[:, :, head:]], dim=2))


def _take_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    # slices, not a list index: an index list would become a lifted constant tensor in run_decompositions
    return torch.cat([x[:, h:h + 1] for h in heads], dim=1)


def band_tile_attention(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
    """Exact ``(out, lse)`` of ``vdit::tile_attention`` from ATen ops (see module doc)."""
    H = q.shape[1]
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # accumulate half precision in fp32, like the reference
        q, k, v = q.float(), k.float(), v.float()
    outs, lses, order = [], [], []
    for key, heads in _groups(global_frames, windows, H, num_frames).items():
        sel = (lambda x: x) if len(heads) == H else (lambda x, i=heads: _take_heads(x, i))
        qh, kh, vh = sel(q), sel(k), sel(v)
        o, l = _dense(qh, kh, vh, scale) if key == "dense" else _sparse(qh, kh, vh, text_prefix, text_suffix, num_frames, key[0], key[1], scale)
        outs.append(o)
        lses.append(l)
        order += heads
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    if order != list(range(H)):
        inverse = [order.index(h) for h in range(H)]
        out, lse = _take_heads(out, inverse), _take_heads(lse, inverse)
    return out.to(dtype), lse


def decompose_tile_attention(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every ``vdit::tile_attention`` replaced by :func:`band_tile_attention`'s ATen ops."""
    table = torch.export.default_decompositions()
    table[torch.ops.vdit.tile_attention.default] = band_tile_attention
    return ep.run_decompositions(table)
