"""Ulysses sequence parallelism for tile attention.

Each rank holds all text tokens (replicated) and its contiguous frames.  One all-to-all
turns the frame-sharded video q/k/v ``(B, H, n_r*P, D)`` into head-sharded full sequences
``(B, H/W, T*P, D)``; text q/k/v for the rank's heads are sliced locally (no traffic).  The
unchanged ``torch.ops.vdit.tile_attention`` runs on the full sequence of ``H/W`` heads, and a
second all-to-all returns every rank's frames (the text rows of all heads are gathered
with it, since text is replicated).  Needs ``H % W == 0``.  Any mask family works unchanged: the op
gets the call's ``grid`` and the rank's heads' ``masks`` (and does its own tile reorder).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..ops.args import encode_masks, resolve
from .comm import exchange


def check_heads(num_heads: int, world_size: int) -> None:
    if num_heads % world_size:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads across ranks: {num_heads} heads are not "
            f"divisible by {world_size} ranks; use mode='tile-ring' or a world size that divides {num_heads}"
        )


def ulysses_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_prefix: int,
    text_suffix: int,
    grid: Sequence[int],
    masks: str,
    scale: float,
    parallel,
    need_lse: bool = False,
):
    """Local ``(B, H, pre + n_r*P + suf, D)`` in, local out (and lse when ``need_lse``)."""
    B, H, Lloc, D = q.shape
    W, rank = parallel.world_size, parallel.rank
    check_heads(H, W)
    grid = [int(x) for x in grid]
    specs = resolve(H, grid, masks).specs
    split = parallel.split(grid[0])
    n_loc = split[rank][1]
    video_loc = Lloc - text_prefix - text_suffix
    if video_loc <= 0 or video_loc % n_loc:
        raise ValueError(f"Ulysses: local sequence of {Lloc} tokens does not hold {n_loc} whole frames plus text")
    P = video_loc // n_loc
    Hl = H // W
    pre, suf = text_prefix, text_suffix
    vid = slice(pre, pre + video_loc)
    if v.shape[-1] != D:
        raise ValueError("Ulysses: q, k and v must share the head dimension")
    # (3, B, H, nP, D) -> one chunk of Hl heads per destination rank
    qkv = torch.stack([q[:, :, vid], k[:, :, vid], v[:, :, vid]])
    chunks = [qkv[:, :, j * Hl : (j + 1) * Hl].contiguous() for j in range(W)]
    per_tok = 3 * B * Hl * D
    got = exchange(chunks, [n * P * per_tok for _, n in split], parallel, "ulysses_qkv").wait()
    full_vid = torch.cat([g.view(3, B, Hl, n * P, D) for g, (_, n) in zip(got, split)], dim=3)
    heads = slice(rank * Hl, (rank + 1) * Hl)

    def with_text(i, t):
        parts = [t[:, heads, :pre], full_vid[i], t[:, heads, Lloc - suf :]]
        return torch.cat(parts, dim=2)

    qf, kf, vf = with_text(0, q), with_text(1, k), with_text(2, v)
    out, lse = torch.ops.vdit.tile_attention(qf, kf, vf, pre, suf, grid, encode_masks(specs[heads]), float(scale))
    # back: rank s gets its frames of my heads; everyone gets my heads' text rows
    payload = torch.cat([out.to(lse.dtype), lse[..., None]], dim=-1) if need_lse else out
    E = payload.shape[-1]
    text_rows = torch.cat([payload[:, :, :pre], payload[:, :, payload.shape[2] - suf :]], dim=2)
    starts = [pre + s * P for s, _ in split]
    back = [torch.cat([payload[:, :, st : st + n * P].reshape(-1), text_rows.reshape(-1)]) for st, (_, n) in zip(starts, split)]
    recv = B * Hl * (n_loc * P + pre + suf) * E
    got = exchange(back, [recv] * W, parallel, "ulysses_out").wait()
    nv = B * Hl * n_loc * P * E
    vids = torch.cat([g[:nv].view(B, Hl, n_loc * P, E) for g in got], dim=1)  # (B, H, nP, E)
    texts = torch.cat([g[nv:].view(B, Hl, pre + suf, E) for g in got], dim=1)  # (B, H, pre+suf, E)
    res = torch.cat([texts[:, :, :pre], vids, texts[:, :, pre:]], dim=2)
    if need_lse:
        return res[..., :D].to(q.dtype).contiguous(), res[..., D].contiguous()
    return res.contiguous(), None
