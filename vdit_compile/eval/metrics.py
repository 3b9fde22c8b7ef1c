"""Per-clip quality metrics: PSNR, SSIM, temporal consistency, flicker.

Every function takes video tensors shaped ``(T, 3, H, W)`` (or a batch ``(B, T, 3, H, W)``) with
values in ``[0, 1]`` and returns plain Python floats per clip, so results go straight into the
scorecard's JSON.  Definitions (also in docs/eval/SCORECARD.md):

* **PSNR** ``10 log10(1 / MSE)`` over all frames, channels and pixels of the clip (data range 1).
  Identical clips give ``inf``.
* **SSIM** Wang et al. (2004): an 11x11 gaussian window (sigma 1.5), ``C1 = (0.01)^2``,
  ``C2 = (0.03)^2``, computed per channel on every frame with 'valid' convolution (no padding),
  averaged over pixels, channels and frames.  Frames smaller than the window use a window of the
  frame's size (odd), so tiny test clips still work.
* **Temporal consistency** mean cosine similarity between the feature vectors of consecutive frames
  (``features(frames) -> (T, D)``; the scorecard uses the shipped classifier's per-frame encoder; a
  default of 4x4-average-pooled pixels is used when no encoder is given).  1 = frames identical in
  feature space; sudden content changes lower it.
* **Flicker** mean absolute *second* temporal difference ``|x[t+1] - 2 x[t] + x[t-1]|`` of the
  luminance after 2x2 average pooling, times 100.  Constant-velocity motion of smooth content has a
  small second difference; frame-to-frame noise or brightness pumping raises it.  Lower is better;
  compare against the value of real procedural clips (the scorecard reports both).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

#: Rec. 601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def _as_batch(video: torch.Tensor, name: str = "video") -> torch.Tensor:
    """Return ``(B, T, 3, H, W)`` float32 (float64 kept); error clearly on anything else."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped (T,3,H,W) or (B,T,3,H,W), found {type(video).__name__}")
    if video.dim() == 4:
        video = video.unsqueeze(0)
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{name} must be shaped (T,3,H,W) or (B,T,3,H,W), found {tuple(video.shape)}")
    return video if video.dtype == torch.float64 else video.float()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(a, "video"), _as_batch(b, "reference")
    if a.shape != b.shape:
        raise ValueError(f"video and reference must have the same shape, found {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def psnr(video: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR in dB per clip (data range 1); ``inf`` when the clips are identical."""
    a, b = _check_pair(video, reference)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(1.0 / m) for m in mse.tolist()]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Normalised 2D gaussian ``(size, size)`` window."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(video: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> list[float]:
    """Mean SSIM per clip (gaussian window, valid convolution, data range 1)."""
    a, b = _check_pair(video, reference)
    B, T, C, H, W = a.shape
    size = min(window, H, W)
    if size % 2 == 0:
        size -= 1
    w = gaussian_window(size, sigma).to(a.device)[None, None].expand(C, 1, size, size)
    x = a.double().reshape(B * T, C, H, W)
    y = b.double().reshape(B * T, C, H, W)

    def blur(z):
        return F.conv2d(z, w, groups=C)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(B, -1).mean(1).tolist()


def pooled_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Default frame features: ``(T, 3, H, W) -> (T, D)`` 4x4 average-pooled pixels, mean-centred per frame."""
    f = F.avg_pool2d(frames.float(), 4) if min(frames.shape[-2:]) >= 4 else frames.float()
    f = f.flatten(1)
    return f - f.mean(1, keepdim=True)


def temporal_consistency(
    video: torch.Tensor, features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> list[float]:
    """Mean cosine similarity of consecutive frames' features, per clip (needs ``T >= 2``)."""
    v = _as_batch(video)
    if v.shape[1] < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames, found {v.shape[1]}")
    feat = features or pooled_pixels
    out = []
    for clip in v:
        with torch.no_grad():
            f = feat(clip).double()
        if f.dim() != 2 or f.shape[0] != clip.shape[0]:
            raise ValueError(f"features() must return (T, D) with T={clip.shape[0]}, found {tuple(f.shape)}")
        out.append(F.cosine_similarity(f[1:], f[:-1], dim=1, eps=1e-8).mean().item())
    return out


def flicker(video: torch.Tensor) -> list[float]:
    """Mean absolute second temporal difference of 2x2-pooled luminance, x100, per clip (needs ``T >= 3``)."""
    v = _as_batch(video)
    B, T, C, H, W = v.shape
    if T < 3:
        raise ValueError(f"flicker needs at least 3 frames, found {T}")
    luma = torch.tensordot(v.double(), torch.tensor(_LUMA, dtype=torch.float64, device=v.device), dims=([2], [0]))
    if min(H, W) >= 2:
        luma = F.avg_pool2d(luma.reshape(B * T, 1, H, W), 2).reshape(B, T, H // 2, W // 2)
    d2 = luma[:, 2:] - 2 * luma[:, 1:-1] + luma[:, :-2]
    return (100.0 * d2.abs().flatten(1).mean(1)).tolist()
