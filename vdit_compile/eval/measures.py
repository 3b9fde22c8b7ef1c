"""Attributes measured from the pixels instead of predicted by a learned head.

Why: the textured world's background drifts 1 pixel per frame (a camera pan).  The attribute classifier sees clips
downsampled to 32 x 32, where that is half a pixel, and its pan head tops out at 59.7% on real clips (run 2's
classifier), so the scorecard's "90% of the ceiling" on pan could not tell a good model from a bad one, and real
clips themselves scored 86% of it.  The drift is directly measurable: the backgrounds are dark and textured, the
objects bright, so matching consecutive frames on their dark pixels under the five candidate shifts finds the pan.

A measure maps ``(B, T, 3, H, W)`` clips in [0, 1] to one label per clip; :data:`MEASURES` names them for a
classifier's config (``AttributeClassifier(..., measured={"pan": "background_drift"})``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Candidate background shifts per frame (dx, dy) in pixels, by pan label: content drifting right moves +x.
DRIFTS = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@torch.no_grad()
def background_drift(videos: torch.Tensor, dark: float = 0.3, margin: int = 2) -> list[str]:
    """The pan of each clip: the candidate shift under which frame ``t+1`` best matches frame ``t`` (mean squared
    difference of the grey level over the pixels dark in both, all consecutive pairs pooled).

    ``dark``: a pixel whose brightest channel is below this is background (the world's backgrounds are dark colours,
    its objects bright).  A clip with no dark pixels at all is called ``still``.
    """
    if videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[1] < 2:
        raise ValueError(f"background_drift expects clips (B, T, 3, H, W) in [0, 1] with T >= 2, found "
                         f"{tuple(videos.shape)}")
    x = videos.float()
    is_dark = x.amax(2) < dark  # (B, T, H, W)
    grey = x.mean(2)
    H, W = grey.shape[-2:]
    m = margin
    if min(H, W) <= 2 * m:
        raise ValueError(f"background_drift needs frames larger than {2 * m} pixels, found {H} x {W}")
    costs = []
    for dx, dy in DRIFTS.values():
        now = (slice(None), slice(1, None), slice(m, H - m), slice(m, W - m))
        before = (slice(None), slice(None, -1), slice(m - dy, H - m - dy), slice(m - dx, W - m - dx))
        both = is_dark[now] & is_dark[before]
        err = ((grey[now] - grey[before]) ** 2 * both).sum((1, 2, 3)) / both.sum((1, 2, 3)).clamp(min=1)
        costs.append(err)
    names = list(DRIFTS)
    return [names[i] for i in torch.stack(costs, -1).argmin(-1).tolist()]


MEASURES: dict[str, Callable[[torch.Tensor], list[str]]] = {"background_drift": background_drift}
MEASURE_LABELS: dict[str, Sequence[str]] = {"background_drift": tuple(DRIFTS)}


def check_measured(measured: dict, attributes: dict) -> None:
    """Clear errors for a classifier config whose measured attributes do not fit (unknown measure or attribute,
    labels the measure can give that the attribute lacks)."""
    for attr, name in measured.items():
        if name not in MEASURES:
            raise ValueError(f"unknown measure {name!r} for attribute {attr!r}; known measures: {sorted(MEASURES)}")
        if attr not in attributes:
            raise ValueError(f"measured attribute {attr!r} is not one of the classifier's attributes "
                             f"{sorted(attributes)}")
        extra = set(MEASURE_LABELS[name]) - set(attributes[attr])
        if extra:
            raise ValueError(f"measure {name!r} gives labels {sorted(extra)} that attribute {attr!r} lacks "
                             f"(its labels: {list(attributes[attr])})")
