"""Sequence-parallel tile attention and the token sharding it assumes.

A frame-sharded tensor holds, along its token dimension, ``[text prefix] + this rank's
frames x P + [text suffix]``: text is replicated on every rank, video frames are split
contiguously (:func:`~.config.frame_split`).  :func:`shard_tokens` and :func:`gather_tokens`
convert between that and the full sequence; :func:`parallel_tile_attention` is the drop-in
parallel form of ``torch.ops.vdit.tile_attention`` for the configured mode.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .comm import gather_dim
from .tile_ring import tile_ring_attention
from .ulysses import ulysses_tile_attention


def local_token_index(pre: int, suf: int, num_frames: int, unit: int, parallel, device=None) -> torch.Tensor:
    """Indices (into the full dimension) of the entries this rank holds."""
    s0, n = parallel.local_frames(num_frames)
    N = num_frames * unit
    return torch.cat([
        torch.arange(pre), torch.arange(pre + s0 * unit, pre + (s0 + n) * unit), torch.arange(pre + N, pre + N + suf)
    ]).to(device)


def shard_tokens(x: torch.Tensor, dim: int, pre: int, suf: int, num_frames: int, parallel) -> torch.Tensor:
    """This rank's part of a full tensor whose ``dim`` is ``pre + num_frames * unit + suf`` long."""
    video = x.shape[dim] - pre - suf
    if video < num_frames or video % num_frames:
        raise ValueError(f"shard_tokens: dim {dim} of size {x.shape[dim]} is not {pre} + {num_frames} frames + {suf}")
    unit = video // num_frames
    if pre == 0 and suf == 0:
        s0, n = parallel.local_frames(num_frames)
        return x.narrow(dim, s0 * unit, n * unit)
    return x.index_select(dim, local_token_index(pre, suf, num_frames, unit, parallel, x.device))


def gather_tokens(x: torch.Tensor, dim: int, pre: int, suf: int, num_frames: int, parallel) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: the full tensor on every rank (text taken from the local copy)."""
    dim = dim % x.dim()
    split = parallel.split(num_frames)
    n_loc = split[parallel.rank][1]
    video = x.shape[dim] - pre - suf
    if video % n_loc:
        raise ValueError(f"gather_tokens: dim {dim} of size {x.shape[dim]} does not hold {n_loc} frames plus text")
    unit = video // n_loc
    pieces = gather_dim(x.narrow(dim, pre, video), dim, [n * unit for _, n in split], parallel)
    return torch.cat([x.narrow(dim, 0, pre), *pieces, x.narrow(dim, pre + video, suf)], dim=dim)


def parallel_tile_attention(
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
    """``tile_attention`` over frame-sharded ``(B, H, pre + n_r*P + suf, D)`` q/k/v -> local (out, lse or None).

    ``grid`` and ``masks`` are the op's (the full clip's ``[T, H, W, tile_h, tile_w]``, any mask family)."""
    fn = ulysses_tile_attention if parallel.mode == "ulysses" else tile_ring_attention
    return fn(q, k, v, text_prefix, text_suffix, [int(x) for x in grid], masks, float(scale), parallel, need_lse)
