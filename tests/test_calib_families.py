"""Calibration over every mask family, per step range, and on block-mass statistics with exact verification,
against independent element-level oracles (dense softmax with each family's element mask, float64)."""
import pytest
import torch

from vdit_compile.calibration import CalibrationSettings, SiteCalibrator, build_plan
from vdit_compile.calibration.candidates import default_family_candidates
from vdit_compile.calibration.run import prepare_verification
from vdit_compile.calibration.steps import choose_step_ranges
from vdit_compile.layout import TokenLayout
from vdit_compile.masks import (
    TileMask,
    UnitGrid,
    Window3D,
    masks_density,
)
from vdit_compile.plans import Plan

ALL = ("tile", "win3d", "spatial")


def _rand(layout, B=1, H=2, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, layout.seq_len, D, generator=g, dtype=dtype) for _ in range(3)]


def _masked(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


def _exact_errors(q, k, v, layout, grid, masks, scale):
    dense = _masked(q, k, v, torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool), scale)
    out = []
    for m in masks:
        em = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool) if m.dense else m.element_mask(layout, grid)
        o = _masked(q, k, v, em, scale)
        out.append(((o - dense).pow(2).sum((0, 2, 3)) / dense.pow(2).sum((0, 2, 3))).sqrt())
    return torch.stack(out, 1)  # (H, C)


@pytest.mark.parametrize("layout", [TokenLayout(3, 4, 4, 2, 3), TokenLayout(4, 2, 6)])
def test_every_family_scored_exactly_on_token_tiles(layout):
    q, k, v = _rand(layout, B=2, seed=layout.seq_len)
    cal = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, block_bytes=20000)
    assert not cal.grid.is_frames and cal.grid.unit_tokens == 4
    cal.observe(q, k, v, 0.5, timestep=900.0)
    want = _exact_errors(q, k, v, layout, cal.grid, cal.candidates, 0.5)
    assert torch.allclose(cal.candidate_errors(), want, atol=1e-9)
    fams = {m.family for m in cal.candidates}
    assert fams == {"tile", "win3d", "spatial"}
    # frame mass folds the unit mass: rows sum to one and match a dense oracle's frame blocks
    fm = cal.frame_mass().double()
    rows = fm.sum(-1)[:, : layout.num_frames + (1 if layout.text_prefix + layout.text_suffix else 0)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)


def test_exact_errors_in_float32_where_kept_scores_underflow_against_the_dense_max():
    """The exact pass merges candidates with the dense weights (a product, not an exp per entry); where a
    candidate keeps only keys scored ~400 below the dropped ones those weights underflow in float32, and the pass
    must fall back to each candidate's own max: errors equal the float64 oracle's, none NaN or inf."""
    layout = TokenLayout(3, 4, 4)
    q, k, v = _rand(layout, B=1, D=8, seed=7, dtype=torch.float32)
    q = q.abs() + 10.0  # every query scores frame 2's keys ~400 above the rest (scale 0.5, D 8)
    k[:, :, 32:] = 10.0
    cal = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, block_bytes=20000)
    cal.observe(q, k, v, 0.5)
    got = cal.candidate_errors()
    want = _exact_errors(q.double(), k.double(), v.double(), layout, cal.grid, cal.candidates, 0.5)
    assert torch.isfinite(got).all()
    assert (want > 0.5).any()  # some candidates drop frame 2 entirely: their kept scores are the underflowing ones
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("layout, block_bytes", [(TokenLayout(3, 4, 4, 2, 3), None), (TokenLayout(3, 4, 4, 2, 3), 300000),
                                                  (TokenLayout(4, 4, 4), 400000)])
def test_whole_unit_blocks_score_every_candidate_exactly(layout, block_bytes, monkeypatch):
    """Rows of whole query units are merged with one product per unit (collector._unit_block_errors), text rows and
    unaligned blocks per row: both against the float64 oracle, and the unit path must really run."""
    import vdit_compile.calibration.collector as col

    calls = []
    real = col._unit_block_errors
    monkeypatch.setattr(col, "_unit_block_errors", lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v = _rand(layout, B=2, seed=3)
    cal = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, block_bytes=block_bytes)
    cal.observe(q, k, v, 0.5)
    assert calls  # the whole-unit path ran
    want = _exact_errors(q, k, v, layout, cal.grid, cal.candidates, 0.5)
    torch.testing.assert_close(cal.candidate_errors(), want, atol=1e-9, rtol=1e-7)
    q32, k32, v32 = (x.float() for x in (q, k, v))
    cal32 = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, block_bytes=block_bytes)
    cal32.observe(q32, k32, v32, 0.5)
    torch.testing.assert_close(cal32.candidate_errors(), want, atol=2e-5, rtol=1e-4)


def test_row_blocks_cover_every_row_once_and_keep_units_whole():
    from vdit_compile.calibration.collector import _row_blocks

    for L, per, pre, N, U, aligned in [(53, 10, 2, 12, 4, True), (53, 3, 2, 12, 4, True), (64, 16, 0, 16, 4, True),
                                       (53, 10, 2, 12, 4, False)]:
        blocks = list(_row_blocks(L, per, pre, N, U, aligned))
        rows = [r for a, b, _ in blocks for r in range(a, b)]
        assert rows == list(range(L)) and all(b - a <= per for a, b, _ in blocks)
        for a, b, whole in blocks:
            if whole:
                assert pre <= a and b <= pre + N * U and (a - pre) % U == 0 and (b - a) % U == 0
        assert any(w for *_, w in blocks) == (aligned and per >= U)


def test_candidates_are_distinct_unit_masks_frame_level_first():
    grid = UnitGrid(4, 4, 4, 2, 2)
    cands = default_family_candidates(ALL, grid)
    assert cands[-1].dense and cands[0].family == "tile"
    keys = [m.unit_mask(grid).numpy().tobytes() for m in cands[:-1]]
    assert len(set(keys)) == len(keys) and not any(m.unit_mask(grid).all() for m in cands[:-1])
    first_window = next(i for i, m in enumerate(cands) if m.family != "tile")
    assert all(m.family == "tile" for m in cands[:first_window])
    # a 3D window equal to a frame tile at this grid is dropped in favour of the frame tile
    assert Window3D(0, 2, 2) not in cands and TileMask(0, 0) in cands


def _local(layout, grid, B=1, H=2, D=16, strength=8.0, seed=0):
    """Each token's q/k carry a strong direction of its own unit: attention stays inside each unit."""
    g = torch.Generator().manual_seed(seed)
    c = grid.token_coords()
    uid = (c[:, 0] * grid.units_per_frame + c[:, 1] * grid.tiles_w + c[:, 2]) % D
    basis = torch.zeros(layout.seq_len, D, dtype=torch.float64)
    basis[torch.arange(layout.video_tokens), uid] = strength
    q = basis + 0.1 * torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    k = basis + 0.1 * torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64)
    return q, k, v


def test_step_ranges_split_where_attention_changes_and_plan_round_trips(tmp_path):
    layout = TokenLayout(4, 4, 4)
    cal = SiteCalibrator("blocks.0.attn1", layout, 2, families=ALL, tile_tokens=4)
    for t, seed in ((900.0, 1), (700.0, 2)):  # early steps: global attention (random)
        cal.observe(*_rand(layout, H=2, D=16, seed=seed, dtype=torch.float64), 0.25, timestep=t)
    for t, seed in ((300.0, 3), (100.0, 4)):  # late steps: attention inside each token tile
        cal.observe(*_local(layout, cal.grid, seed=seed), 0.25, timestep=t)
    assert cal.timesteps == [900.0, 700.0, 300.0, 100.0]
    ranges = choose_step_ranges([cal], 3, 0.05)
    assert ranges == [[900.0, 700.0], [300.0, 100.0]]  # a third range gains nothing
    plan = build_plan(torch.nn.Linear(2, 2), {cal.name: cal}, CalibrationSettings(error_budget=0.05, step_ranges=3))
    sp = plan.sites[0]
    assert sp.tiled and [r.min_timestep for r in sp.step_ranges] == [700.0, None]
    late = sp.step_ranges[1]
    assert all(m.needs_tiles for m in late.masks) and sp.tile == (cal.grid.tile_h, cal.grid.tile_w)
    assert all(m.dense for m in sp.step_ranges[0].masks) and sp.masks == sp.step_ranges[0].masks
    assert plan.step_range_of(800.0) == 0 and plan.step_range_of(150.0) == 1
    assert late.densities[0] == pytest.approx(masks_density([late.masks[0]], layout, cal.grid))
    again = Plan.load(plan.save(tmp_path / "p.json"))
    assert again.to_dict() == plan.to_dict()
    from vdit_compile.plans.show import format_table, write_heatmaps

    table = format_table(again)
    assert "step ranges" in table and "t >= 700" in table and "every lower t" in table
    assert f"{cal.grid.tile_h}x{cal.grid.tile_w}" in table and "dense 2" in table
    assert len(write_heatmaps(again, tmp_path / "maps")) == 1
    # without step ranges the worst steps decide: every head dense
    one = build_plan(torch.nn.Linear(2, 2), {cal.name: cal}, CalibrationSettings(error_budget=0.05))
    assert one.sites[0].status == "dense" and one.sites[0].step_ranges is None


def test_frame_level_choices_need_no_tile():
    layout = TokenLayout(4, 2, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(4).repeat_interleave(4)
    basis = torch.zeros(16, 16, dtype=torch.float64)
    basis[torch.arange(16), ids] = 8.0  # frame-local attention: the frame tile g0w0 is exact
    q, k = (basis + 0.1 * torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64)
    cal = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=1)
    cal.observe(q, k, v, 0.25)
    sp = build_plan(torch.nn.Linear(2, 2), {"s": cal}, CalibrationSettings(error_budget=0.05)).sites[0]
    assert sp.masks == [TileMask(0, 0)] * 2 and sp.tile is None


def test_given_picks_replace_the_selection_rule():
    """build_plan(picks=...) takes a candidate index per head instead of the rule's choice (benchmark experiments
    with other rules); bad picks or step ranges beside them are refused with what was expected."""
    layout = TokenLayout(4, 2, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(4).repeat_interleave(4)
    basis = torch.zeros(16, 16, dtype=torch.float64)
    basis[torch.arange(16), ids] = 8.0
    q, k = (basis + 0.1 * torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64)
    cal = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=1)
    cal.observe(q, k, v, 0.25)
    settings = CalibrationSettings(error_budget=0.05)
    rule = build_plan(torch.nn.Linear(2, 2), {"s": cal}, settings).sites[0]
    dense = next(i for i, m in enumerate(cal.candidates) if m.dense)
    assert not any(m.dense for m in rule.masks)  # the rule tiles both heads: the picks below change the plan
    given = build_plan(torch.nn.Linear(2, 2), {"s": cal}, settings, picks={"s": [dense, dense]}).sites[0]
    assert given.status == "dense" and all(m.dense for m in given.masks)
    with pytest.raises(ValueError, match="one candidate index"):
        build_plan(torch.nn.Linear(2, 2), {"s": cal}, settings, picks={"s": [dense]})
    with pytest.raises(ValueError, match="step_ranges"):
        build_plan(torch.nn.Linear(2, 2), {"s": cal}, CalibrationSettings(error_budget=0.05, step_ranges=3),
                   picks={"s": [dense, dense]})


def test_no_candidate_within_bounds_is_reported_not_crashing():
    layout = TokenLayout(3, 2, 2)
    cal = SiteCalibrator("s", layout, 2)
    cal.observe(*_rand(layout), 0.5)
    res = cal.result(0.0, max_density=None)  # only dense meets error 0; with no density bound: no None format
    assert all(m.dense for m in res.masks)
    res = cal.result(1e-12, max_density=0.5)
    assert not any(res.within_budget) and "density <= 0.5" in res.notes[0]


def test_mass_method_estimates_then_verifies_exactly():
    layout = TokenLayout(4, 4, 4, 3, 0)
    calls = [(_rand(layout, B=1, H=3, D=16, seed=s), t) for s, t in ((5, 900.0), (6, 500.0))]
    calls.append(((_local(layout, UnitGrid(4, 4, 4, 2, 2), H=3)), 100.0))
    ex = SiteCalibrator("s", layout, 3, families=ALL, tile_tokens=4, method="exact")
    ms = SiteCalibrator("s", layout, 3, families=ALL, tile_tokens=4, method="mass")
    for (q, k, v), t in calls:
        ex.observe(q, k, v, 0.3, timestep=t)
        ms.observe(q, k, v, 0.3, timestep=t)
    assert torch.allclose(ex.frame_mass(), ms.frame_mass(), atol=1e-5)  # same statistics, other path
    est = ms.candidate_errors()
    assert torch.isfinite(est).all() and (est[:, [m.dense for m in ms.candidates].index(True)] < 1e-6).all()
    budget = 0.2
    cfg = CalibrationSettings(error_budget=budget)
    assert prepare_verification({"s": ms}, cfg) and not prepare_verification({"s": ex}, cfg)
    for (q, k, v), t in calls:  # the second pass
        ms.observe(q, k, v, 0.3, timestep=t)
    assert ms.observations == 3
    got = ms.candidate_errors()
    exact = ex.candidate_errors()
    # every candidate is verified (all rows: the sequence is shorter than verify_rows), so the plan is the exact one
    torch.testing.assert_close(got, exact, atol=1e-9, rtol=0)
    res = ms.result(budget)
    assert all(e <= budget for e in res.errors)  # the budget holds with the real output error
    assert res.errors == pytest.approx([float(exact[h, ms.candidates.index(m)]) for h, m in enumerate(res.masks)])
    assert [m.name for m in res.masks] == [m.name for m in ex.result(budget).masks]

    # the pre-selection (every=False): a few candidates per head, exact where verified, never an unverified choice
    ms.begin_verify(budget, None, None, every=False)
    for (q, k, v), t in calls:
        ms.observe(q, k, v, 0.3, timestep=t)
    got = ms.candidate_errors()
    verified = torch.isfinite(got[0])
    assert verified.sum() < len(ms.candidates) and torch.allclose(got[:, verified], exact[:, verified], atol=1e-9)
    res = ms.result(budget)
    assert all(e <= budget for e in res.errors)
    assert all(verified[ms.candidates.index(m)] for m in res.masks)


def test_mass_verification_on_sampled_rows_is_close_to_exact():
    """Longer than ``verify_rows``: the verification scores every candidate on evenly spaced query rows; its
    relative errors are close to the all-rows exact ones (both sums are unbiased over the rows)."""
    layout = TokenLayout(4, 6, 6, 5, 0)
    grid_local = UnitGrid(4, 6, 6, 2, 2)
    calls = [(_local(layout, grid_local, H=2, seed=s), float(t)) for s, t in ((1, 900), (2, 500), (3, 100))]
    ex = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, method="exact")
    ms = SiteCalibrator("s", layout, 2, families=ALL, tile_tokens=4, method="mass", verify_rows=64)
    for (q, k, v), t in calls:
        ex.observe(q, k, v, 0.3, timestep=t)
        ms.observe(q, k, v, 0.3, timestep=t)
    assert prepare_verification({"s": ms}, CalibrationSettings(error_budget=0.1))
    for (q, k, v), t in calls:
        ms.observe(q, k, v, 0.3, timestep=t)
    got, exact = ms.candidate_errors(), ex.candidate_errors()
    assert torch.isfinite(got).all()
    big = exact > 0.02
    assert ((got[big] - exact[big]).abs() / exact[big]).median() < 0.25


def test_frame_minor_site_statistics_equal_the_frame_major_ones():
    """A site whose tokens are ordered (H, W, T) is calibrated in unit order: its candidate errors equal those of the
    same tokens permuted frame-major (THW layout), for frame-level and window families alike."""
    import torch

    from vdit_compile.calibration.collector import SiteCalibrator
    from vdit_compile.layout import TokenLayout

    T, H, W, pre, suf = 4, 4, 6, 3, 2
    thw = TokenLayout(T, H, W, pre, suf)
    hwt = TokenLayout(T, H, W, pre, suf, order="HWT")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, thw.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    # model-order index of the HWT token holding frame-major token (t, h, w)
    idx = torch.arange(T * H * W).view(H, W, T).permute(2, 0, 1).reshape(-1)
    to_hwt = torch.empty_like(idx)
    to_hwt[idx] = torch.arange(idx.numel())

    def as_hwt(x):
        vid = x[:, :, pre:pre + T * H * W][:, :, to_hwt]
        return torch.cat([x[:, :, :pre], vid, x[:, :, pre + T * H * W:]], dim=2)

    for families in (("tile",), ("tile", "win3d", "spatial")):
        a = SiteCalibrator("s", thw, 2, families=families, tile_tokens=4)
        b = SiteCalibrator("s", hwt, 2, families=families, tile_tokens=4)
        a.observe(q, k, v, 0.3)
        b.observe(as_hwt(q), as_hwt(k), as_hwt(v), 0.3)
        assert [c.name for c in a.candidates] == [c.name for c in b.candidates]
        torch.testing.assert_close(b.candidate_errors(), a.candidate_errors())


def test_step_ranges_share_the_pooled_error_of_the_step_agnostic_choice():
    """allocate_ranges against brute force: per head the least call-weighted density over every combination of
    one candidate per range, each range within the budget, the pooled squared error at most the step-agnostic
    choice's or (floor * budget)^2 of the norm; never sparser than each range alone would be."""
    from itertools import product

    from vdit_compile.calibration.collector import _StepStats
    from vdit_compile.calibration.steps import POOLED_FLOOR, allocate_ranges

    layout = TokenLayout(4, 2, 2)
    cal = SiteCalibrator("s", layout, 3)  # frame tiles: a handful of candidates, dense last
    C, H = len(cal.candidates), 3
    dens = cal.candidate_densities()
    g = torch.Generator().manual_seed(0)
    ts = [900.0, 600.0, 300.0, 100.0]
    for t in ts:
        st = cal._steps[t] = _StepStats(H, C)
        st.norm_sq += 1.0
        sparse = 1 - torch.tensor(dens, dtype=torch.float64)  # sparser masks err more, with noise
        st.err_sq += (0.012 * sparse * (1 + torch.rand(H, C, generator=g, dtype=torch.float64) * 3)) ** 2
        st.err_sq[:, -1] = 0.0
        st.calls = 1
    cal.observations = len(ts)
    ranges = [[900.0, 600.0], [300.0], [100.0]]
    budget = 0.02
    picks = allocate_ranges(cal, ranges, budget)
    err = [cal.error_sums(r) for r in ranges]
    e_all, n_all = cal.error_sums()
    single, _ = cal.choose((e_all / n_all[:, None]).sqrt(), dens, budget)
    w = [len(r) for r in ranges]
    for h in range(H):
        cap = max(float(e_all[h, single[h]]), (POOLED_FLOOR * budget) ** 2 * float(n_all[h]))
        best = None
        for combo in product(range(C), repeat=len(ranges)):
            if any(float(e[h, c]) > budget ** 2 * float(n[h]) for (e, n), c in zip(err, combo)):
                continue
            if sum(float(e[h, c]) for (e, _), c in zip(err, combo)) > cap * (1 + 1e-9):
                continue
            cost = sum(wr * dens[c] for wr, c in zip(w, combo))
            best = cost if best is None else min(best, cost)
        got = [picks[r][h] for r in range(len(ranges))]
        assert sum(wr * dens[c] for wr, c in zip(w, got)) == pytest.approx(best)
        assert sum(float(e[h, c]) for (e, _), c in zip(err, got)) <= cap * (1 + 1e-9)
        own = [cal.result(budget, None, r).masks[h] for r in ranges]
        assert all(dens[c] >= own_m.density(layout, cal.grid) - 1e-12 for c, own_m in zip(got, own))
    assert any(picks[r] != picks[0] for r in range(1, len(ranges)))  # the ranges do differ here


def test_tile_capped_selection_against_brute_force():
    """capped_picks against brute force on small random inputs: the least summed density over every combination of
    one candidate per head with each head within the budget and the summed squared error at most the frame-level
    reference's (per head its sparsest frame-level candidate within the budget); ties to less error."""
    from itertools import product

    from vdit_compile.calibration.allocation import capped_picks

    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        H, C = 3, 6
        dens = sorted(torch.rand(C - 1, generator=g, dtype=torch.float64).tolist()) + [1.0]  # dense last
        reference = [bool(x) for x in torch.rand(C, generator=g) < 0.4]
        reference[-1] = True
        norm = 1 + torch.rand(H, generator=g, dtype=torch.float64)
        sparse = 1 - torch.tensor(dens, dtype=torch.float64)
        err = (0.1 * sparse * (0.3 + 2 * torch.rand(H, C, generator=g, dtype=torch.float64))) ** 2 * norm[:, None]
        budget = [0.03, 0.06, 0.1][trial % 3]
        lim = [budget ** 2 * float(n) * (1 + 1e-9) for n in norm]
        cap = 0.0
        for h in range(H):
            ok = [c for c in range(C) if reference[c] and float(err[h, c]) <= lim[h]]
            cap += float(err[h, min(ok, key=lambda c: (dens[c], float(err[h, c]), c))])
        best = None
        for combo in product(range(C), repeat=H):
            if any(float(err[h, c]) > lim[h] for h, c in enumerate(combo)):
                continue
            e = sum(float(err[h, c]) for h, c in enumerate(combo))
            if e > cap * (1 + 1e-9):
                continue
            key = (round(sum(dens[c] for c in combo), 12), e)
            best = key if best is None else min(best, key)
        got = capped_picks(err, norm, dens, budget, reference)
        assert got is not None
        assert sum(dens[c] for c in got) == pytest.approx(best[0])
        assert sum(float(err[h, c]) for h, c in enumerate(got)) == pytest.approx(best[1])
        assert all(float(err[h, c]) <= lim[h] for h, c in enumerate(got))  # the budget holds per head


def test_tile_capped_plan_is_never_denser_nor_errs_more_than_frame_tiles():
    """On a site calibrated with every family: the tile-capped plan keeps each head within the budget, is at most as
    dense as the frame-tile-only plan, and its summed squared error is at most that plan's; the head rule's plan is
    at most as dense as either."""
    layout = TokenLayout(4, 4, 4)
    q, k, v = _rand(layout, H=4, D=8, seed=3)
    q = q * 3  # sharper attention: frame tiles and windows both have something to drop
    plans = {}
    for fams in (("tile",), ALL):
        cal = SiteCalibrator("s", layout, 4, families=fams, tile_tokens=4)
        cal.observe(q, k, v, None, timestep=500.0)
        cal.observe(q.flip(2), k, v, None, timestep=100.0)
        plans[fams] = cal
    budget = 0.5
    tile_res = plans[("tile",)].result(budget)
    cal = plans[ALL]
    err, norm = cal.error_sums()
    for sel in ("head", "tile-capped"):
        settings = CalibrationSettings(error_budget=budget, selection=sel)
        plan = build_plan(torch.nn.Linear(1, 1), {"s": cal}, settings)
        site = plan.site("s")
        idx = [cal.candidates.index(m) for m in site.masks] if site.tiled else [len(cal.candidates) - 1] * 4
        assert all(e <= budget + 1e-12 for e in site.errors)
        if sel == "tile-capped":
            assert site.density <= tile_res.density + 1e-12
            tile_err = sum(e ** 2 * float(n) for e, n in zip(tile_res.errors, norm))
            assert sum(float(err[h, c]) for h, c in enumerate(idx)) <= tile_err * (1 + 1e-9)
        plans[sel] = site.density
    assert plans["head"] < plans["tile-capped"] < tile_res.density  # here the three differ (0.773, 0.867, 0.875)
    with pytest.raises(ValueError, match="selection"):
        CalibrationSettings(selection="global")


def test_collect_calibration_gives_optimize_plans_at_any_budget_and_leaves_the_model_untouched():
    """One calibration's statistics (``collect_calibration``) build, at each budget, the same plan that ``optimize``
    calibrates on the same inputs; the model's forward is unchanged afterwards."""
    from calib_helpers import tiny_wan, wan_inputs

    import vdit_compile
    from vdit_compile.api import collect_calibration

    model, example = tiny_wan()
    inputs = [example, wan_inputs(seed=2)]
    before = model(**example)[0]
    cals, sites = collect_calibration(model, calib_inputs=inputs, progress=False, families=ALL, tile_tokens=4)
    assert vdit_compile.plan_of(model) is None
    assert sorted(cals) == sorted(s.name for s in sites if s.tileable) == ["blocks.0.attn1", "blocks.1.attn1"]
    torch.testing.assert_close(model(**example)[0], before, rtol=0, atol=0)
    for budget in (0.05, 0.3):
        vdit_compile.optimize(model, calib_inputs=inputs, progress=False, families=ALL, tile_tokens=4,
                              error_budget=budget)
        want = vdit_compile.plan_of(model)
        vdit_compile.restore(model)
        settings = CalibrationSettings(error_budget=budget, num_inputs=len(inputs), families=list(ALL), tile_tokens=4)
        got = build_plan(model, cals, settings, sites)
        assert [s.masks for s in got.sites] == [s.masks for s in want.sites]
