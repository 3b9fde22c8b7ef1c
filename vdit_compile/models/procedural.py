"""What the procedural worlds' data modules share (``models.embedded.data``, ``models.textured.data``).

Both worlds make a clip from a seed, send a batch's per-clip numbers to the device in one copy and draw the
same five shapes as anti-aliased layers. Stating those once keeps the worlds' conventions (which seeds are
accepted, how ``sample_batch`` draws seeds, the shapes' outlines) from drifting apart; what makes a world
(attributes, captions, backgrounds, textures, motion) stays in its own module.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable

import torch

SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def check_seed(seed) -> int:
    """A clip's seed: an ``int`` (``bool`` refused), else TypeError."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


def draw_seeds(seeds: Iterable[int] | None, batch: int | None,
               generator: torch.Generator | random.Random | None) -> list[int]:
    """``sample_batch``'s clip seeds: ``seeds`` as given, or ``batch`` seeds drawn from ``generator``
    (torch.Generator or random.Random)."""
    if seeds is None:
        if batch is None or generator is None:
            raise ValueError("sample_batch needs seeds=..., or batch=... together with generator=...")
        if isinstance(generator, torch.Generator):
            seeds = torch.randint(0, 2**62, (batch,), generator=generator).tolist()
        else:
            seeds = [generator.randrange(2**62) for _ in range(batch)]
    return [int(s) for s in seeds]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; to CUDA through pinned memory without blocking: a pageable copy would make the host
    wait for the GPU's queued work (the training step) every batch."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def shape_sdf(shape_id: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (pixels, negative inside) of each shape; shape_id (index into SHAPES) selects
    per element."""
    ax, ay = px.abs(), py.abs()
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(ax, ay) - 0.85 * r
    diamond = (ax + ay) / math.sqrt(2.0) - 0.85 * r
    tri = None
    for k in range(3):  # equilateral, apex up (image y grows downwards)
        a = math.pi / 2 + k * 2 * math.pi / 3
        d = px * math.cos(a) + py * math.sin(a)
        tri = d if tri is None else torch.maximum(tri, d)
    tri = tri - 0.6 * r
    arm = 0.33 * r
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    stack = torch.stack([circle, square, tri, diamond, cross])  # order of SHAPES
    return torch.gather(stack, 0, shape_id.expand_as(circle).unsqueeze(0).long()).squeeze(0)


def shape_layer(shape_id: torch.Tensor, path: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor):
    """One object layer of a batch: ``shape_id`` (B,), ``path`` (B, T, 4) per frame (cx, cy, radius, angle),
    pixel centres ``xx`` / ``yy`` (H, W). Returns the object-frame coordinates ``px``, ``py`` (B, T, H, W), the
    radius ``r`` (B, T, 1, 1) and ``alpha`` (B, T, H, W): a one-pixel anti-aliased edge, 0 where ``r`` is 0
    (no object)."""
    cx, cy, r, ang = (path[..., i][..., None, None] for i in range(4))
    dx, dy = xx - cx, yy - cy  # (B, T, H, W)
    c, s = torch.cos(ang), torch.sin(ang)
    px, py = c * dx + s * dy, -s * dx + c * dy
    sdf = shape_sdf(shape_id[:, None, None, None].expand_as(px), px, py, r)
    return px, py, r, (0.5 - sdf).clamp(0.0, 1.0) * (r > 0)
