"""Bytes one rank sends per attention call, from the shapes and the plan alone.

The same arithmetic as :mod:`.ulysses` and :mod:`.tile_ring` (the gloo tests check it against
the bytes those forms actually count), so communication can be compared for shapes too large
to run here, e.g. the benchmark's ``--predict`` table.
"""
from __future__ import annotations

from typing import Sequence

from .config import frame_split
from .tile_ring import ring_plan


def attention_bytes(mode: str, grid: Sequence[int], text_prefix: int, text_suffix: int, num_heads: int,
                    head_dim: int, world_size: int, rank: int, masks: str,
                    batch: int = 1, itemsize: int = 2, acc_itemsize: int = 4) -> int:
    """Bytes ``rank`` sends to other ranks in one call of the parallel form (lse not requested).

    ``grid`` and ``masks`` are the op's arguments (any mask family)."""
    W, D, H, B = world_size, head_dim, num_heads, batch
    num_frames, P = int(grid[0]), int(grid[1]) * int(grid[2])
    text = text_prefix + text_suffix
    split = frame_split(num_frames, W)
    n = split[rank][1]
    if mode == "ulysses":
        Hl = H // W
        qkv = 3 * B * Hl * n * P * D * (W - 1)
        back = sum(B * Hl * (ns * P + text) * D for s, (_, ns) in enumerate(split) if s != rank)
        return (qkv + back) * itemsize
    if mode != "tile-ring":
        raise ValueError(f"unknown mode {mode!r}")
    plan = ring_plan(tuple(int(x) for x in grid), W, H, masks)
    P = plan.om.grid.unit_tokens  # units move, not frames
    own_global = plan.bcast[rank]
    first = sum(B * H * P * len([f for f in plan.need[t][rank] if f not in own_global]) * 2 * D for t in range(W) if t != rank)
    first += B * H * P * len(own_global) * 3 * D  # broadcast of global frames' k, v, q: counted once at the source
    second = sum(B * H * (text + len(plan.bcast[t]) * P) * (D + 1) for t in range(W) if t != rank)
    return first * itemsize + second * acc_itemsize
