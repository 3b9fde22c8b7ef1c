"""SiteCalibrator: frame mass, candidate errors and the per-head mask choice against independent oracles."""
import pytest
import torch

from vdit_compile.calibration.collector import SiteCalibrator, default_candidates
from vdit_compile.layout import TokenLayout
from vdit_compile.masks import TileMask, mask_density
from vdit_compile.ops.reference import dense_masked_attention


def _rand(layout, B=2, H=3, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, layout.seq_len, D, generator=g, dtype=dtype) for _ in range(3)]


def _frame_local(layout, B=1, H=2, D=16, strength=6.0, seed=0):
    """q/k of frame f share a strong frame-specific direction: attention stays inside each frame."""
    g = torch.Generator().manual_seed(seed)
    ids = layout.frame_ids()
    basis = torch.zeros(layout.seq_len, D, dtype=torch.float64)
    vid = ids >= 0
    basis[vid, ids[vid]] = strength
    q = basis + 0.1 * torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    k = basis + 0.1 * torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    return q, k, v


def _oracle_mass(q, k, layout, scale):
    """Dense softmax, then mean probability per (query group, key group); text is group T."""
    T = layout.num_frames
    p = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
    ids = layout.frame_ids().clone()
    ids[ids < 0] = T
    oh = torch.nn.functional.one_hot(ids, T + 1).to(p.dtype)
    num = torch.einsum("bhqk,qi,kj->hij", p, oh, oh)
    return num / (oh.sum(0)[None, :, None] * q.shape[0]).clamp(min=1)


@pytest.mark.parametrize("layout", [TokenLayout(4, 2, 3, 3, 2), TokenLayout(3, 2, 2), TokenLayout(5, 1, 3, 0, 4)])
def test_frame_mass_and_errors_match_dense_oracle(layout):
    q, k, v = _rand(layout, seed=layout.seq_len)
    scale = 0.4
    cal = SiteCalibrator("s", layout, 3, block_bytes=3000)  # forces many row blocks
    cal.observe(q[:1], k[:1], v[:1], scale)
    cal.observe(q[1:], k[1:], v[1:], scale)  # two calls accumulate like one batch of two
    assert torch.allclose(cal.frame_mass().double(), _oracle_mass(q, k, layout, scale), atol=1e-6)
    dense = dense_masked_attention(q, k, v, layout, torch.ones(1, layout.num_frames, layout.num_frames, dtype=torch.bool), scale)
    errs = cal.candidate_errors()
    for c, m in enumerate(cal.candidates):
        out = dense_masked_attention(q, k, v, layout, m.frame_mask(layout.num_frames)[None], scale)
        want = ((out - dense).pow(2).sum((0, 2, 3)) / dense.pow(2).sum((0, 2, 3))).sqrt()
        assert torch.allclose(errs[:, c], want, atol=1e-9), m.name
    assert errs[:, [m.dense for m in cal.candidates].index(True)].abs().max() < 1e-12


def test_block_size_does_not_change_statistics_and_low_precision_inputs_work():
    layout = TokenLayout(4, 2, 2, 2, 0)
    q, k, v = _rand(layout, dtype=torch.float32, seed=3)
    a, b = SiteCalibrator("a", layout, 3, block_bytes=1), SiteCalibrator("b", layout, 3)
    a.observe(q, k, v, 0.5)
    b.observe(q, k, v, 0.5)
    assert torch.allclose(a.candidate_errors(), b.candidate_errors(), atol=1e-5)
    assert torch.allclose(a.frame_mass(), b.frame_mass(), atol=1e-6)
    c = SiteCalibrator("c", layout, 3)
    c.observe(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.5)
    assert torch.allclose(c.frame_mass(), b.frame_mass(), atol=3e-2)


def test_frame_local_attention_picks_the_sparsest_mask():
    layout = TokenLayout(4, 2, 2, 2, 1)
    q, k, v = _frame_local(layout)
    cal = SiteCalibrator("s", layout, 2)
    cal.observe(q, k, v, 1.0)
    res = cal.result(0.05)
    assert [m.name for m in res.masks] == ["g0w0", "g0w0"]
    assert max(res.errors) < 1e-6
    assert res.densities[0] == pytest.approx(mask_density(TileMask(0, 0).frame_mask(4), layout))
    diag = res.frame_mass[:, torch.arange(4), torch.arange(4)]
    assert diag.min() > 0.99


def test_random_data_under_tight_budget_stays_dense():
    layout = TokenLayout(4, 2, 2, 0, 0)
    q, k, v = _rand(layout, seed=7)
    cal = SiteCalibrator("s", layout, 3)
    cal.observe(q, k, v, 1.0)
    res = cal.result(1e-3)
    assert all(m.dense for m in res.masks) and res.errors == [0.0] * 3 and res.densities == [1.0] * 3
    assert all(res.within_budget)


def test_budget_and_density_bounds():
    layout = TokenLayout(4, 2, 2, 1, 0)
    q, k, v = _rand(layout, seed=11)
    cal = SiteCalibrator("s", layout, 3)
    cal.observe(q, k, v, 1.0)
    errs, dens = cal.candidate_errors(), cal.candidate_densities()
    # a loose budget: per head the sparsest admissible mask, ties by error
    budget = float(errs[:, :-1].median())
    res = cal.result(budget)
    for h in range(3):
        ok = [c for c in range(len(dens)) if errs[h, c] <= budget]
        best = min(ok, key=lambda c: (dens[c], float(errs[h, c])))
        assert res.masks[h] == cal.candidates[best] and res.within_budget[h]
    # budget unreachable within the density bound: least error inside the bound, reported
    bound = sorted(dens)[2]
    res = cal.result(1e-9, max_density=bound)
    for h in range(3):
        inside = [c for c in range(len(dens)) if dens[c] <= bound]
        best = min(inside, key=lambda c: float(errs[h, c]))
        assert res.masks[h] == cal.candidates[best]
        assert res.densities[h] <= bound and not res.within_budget[h] and "least-error" in res.notes[h]
    # bound below every candidate: the sparsest, reported
    res = cal.result(1e-9, max_density=1e-4)
    assert all(m == TileMask(0, 0) for m in res.masks) and "sparsest" in res.notes[0]
    assert res.notes[0].startswith("no mask reaches density <= 0.0001; took sparsest"), res.notes[0]


def test_default_candidates_are_distinct_and_include_dense():
    for T in (1, 2, 4, 9):
        cands = default_candidates(T)
        pats = [m.frame_mask(T).numpy().tobytes() for m in cands]
        assert len(set(pats)) == len(pats) and cands[-1].dense
        assert all(m.dense or not m.frame_mask(T).all() for m in cands)
    names = [m.name for m in default_candidates(9)]
    assert names[0] == "g0w0" and "g4w2" in names and len(names) == 16


def test_bad_inputs_are_explained():
    layout = TokenLayout(2, 2, 2)
    cal = SiteCalibrator("blocks.0.attn1", layout, 2)
    with pytest.raises(ValueError, match="heads"):
        cal.observe(*[torch.randn(1, 3, 8, 4)] * 3, 1.0)
    with pytest.raises(ValueError, match="observed a sequence of 9 tokens.*2x2x2"):
        cal.observe(*[torch.randn(1, 2, 9, 4)] * 3, 1.0)
    with pytest.raises(RuntimeError, match="no calibration data"):
        cal.result(0.05)
    with pytest.raises(ValueError, match="TokenLayout"):
        SiteCalibrator("x", None, 2)


def test_masks_keeping_only_far_lower_scores_stay_exact():
    """A query whose own-frame scores are ~200 below another frame's: g0w0's output is still exact."""
    layout = TokenLayout(3, 1, 2)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 6, 4, generator=g)
    k = torch.randn(1, 1, 6, 4, generator=g)
    v = torch.randn(1, 1, 6, 4, generator=g)
    q[..., 2:4, :] = torch.tensor([10.0, 0, 0, 0])
    k[..., 0:2, :] = torch.tensor([20.0, 0, 0, 0])  # frame 1's queries score ~200 on frame 0's keys
    cal = SiteCalibrator("s", layout, 1)
    cal.observe(q, k, v, 1.0)
    errs = cal.candidate_errors()
    assert torch.isfinite(errs).all()
    dense = dense_masked_attention(q.double(), k.double(), v.double(), layout, torch.ones(1, 3, 3, dtype=torch.bool), 1.0)
    g0w0 = dense_masked_attention(q.double(), k.double(), v.double(), layout, TileMask(0, 0).frame_mask(3)[None], 1.0)
    want = ((g0w0 - dense).norm() / dense.norm()).item()
    assert errs[0, cal.candidates.index(TileMask(0, 0))].item() == pytest.approx(want, rel=1e-5)
