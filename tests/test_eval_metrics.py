"""Scorecard metrics against closed forms and direct formulas."""
import math

import pytest
import torch

from vdit_compile.eval import metrics


def _clip(seed, T=4, H=16, W=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, 3, H, W, generator=g)


def test_psnr_of_known_noise():
    x = torch.full((3, 3, 8, 8), 0.5)
    # +-0.1 noise (sign random) has MSE exactly 0.01 -> 20 dB
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    assert metrics.psnr(x + 0.1 * sign, x)[0] == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(x, x) == [math.inf]


def test_psnr_batched_per_clip():
    a = torch.zeros(2, 3, 3, 8, 8)
    b = a.clone()
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    out = metrics.psnr(a, b)
    assert out[0] == math.inf and out[1] == pytest.approx(40.0, abs=1e-3)


def test_ssim_identical_is_one_and_decreases_with_noise():
    x = _clip(1)
    assert metrics.ssim(x, x)[0] == pytest.approx(1.0, abs=1e-9)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    vals = [metrics.ssim((x + s * noise).clamp(0, 1), x)[0] for s in (0.02, 0.1, 0.3)]
    assert 1.0 > vals[0] > vals[1] > vals[2]


def test_ssim_matches_direct_formula_on_one_window():
    # an 11x11 frame has exactly one 'valid' window: SSIM = weighted-statistics formula evaluated once
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 11, 11, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(1, 3, 11, 11, generator=g, dtype=torch.float64)).clamp(0, 1)
    w = metrics.gaussian_window(11, 1.5)
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for c in range(3):
        a, b = x[0, c], y[0, c]
        ma, mb = (w * a).sum(), (w * b).sum()
        va = (w * (a - ma) ** 2).sum()
        vb = (w * (b - mb) ** 2).sum()
        cov = (w * (a - ma) * (b - mb)).sum()
        per_channel.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    expected = torch.stack(per_channel).mean().item()
    assert metrics.ssim(x, y)[0] == pytest.approx(expected, rel=1e-9)


def test_ssim_constant_shift_closed_form():
    # constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    a, b = 0.3, 0.5
    x, y = torch.full((2, 3, 12, 12), a), torch.full((2, 3, 12, 12), b)
    expected = (2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2)
    assert metrics.ssim(x, y)[0] == pytest.approx(expected, rel=1e-6)


def test_temporal_consistency_and_flicker():
    still = _clip(4, T=1).expand(6, 3, 16, 16).contiguous()
    assert metrics.temporal_consistency(still)[0] == pytest.approx(1.0, abs=1e-9)
    assert metrics.flicker(still)[0] == pytest.approx(0.0, abs=1e-12)
    noisy = _clip(5, T=6)
    assert metrics.temporal_consistency(noisy)[0] < 0.5
    assert metrics.flicker(noisy)[0] > 5.0
    # a linear brightness ramp has zero second difference: no flicker
    ramp = torch.linspace(0.1, 0.6, 6)[:, None, None, None].expand(6, 3, 8, 8)
    assert metrics.flicker(ramp)[0] == pytest.approx(0.0, abs=1e-4)
    # brightness pumping (alternating) is flicker: |0.6 - 2*0.4 + 0.6| luma = 0.4 -> 40
    pump = torch.tensor([0.4, 0.6] * 3)[:, None, None, None].expand(6, 3, 8, 8)
    assert metrics.flicker(pump)[0] == pytest.approx(40.0, rel=1e-6)


def test_custom_features_and_bad_input():
    clip = _clip(6, T=3)
    calls = []

    def feats(frames):
        calls.append(frames.shape)
        return frames.mean(dim=(2, 3))

    assert 0 < metrics.temporal_consistency(clip, feats)[0] <= 1.0
    assert calls == [(3, 3, 16, 16)]
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(clip, clip[:2])
    with pytest.raises(ValueError, match=r"\(T,3,H,W\)"):
        metrics.ssim(clip[:, :1], clip[:, :1])
