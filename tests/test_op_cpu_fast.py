"""The fast CPU tile-attention op (vdit_compile.ops.cpu_fast) against two independent oracles, and the cost model.

Oracles: the float64 gather reference (ops/reference.py) and dense SDPA with the equivalent ``L x L``
boolean mask.  Fresh random inputs; float32 and bfloat16 tolerances; text prefix/suffix, per-head
different masks, dense heads, the log-sum-exp gradient.
"""
import pytest
import torch

import vdit_compile as vc
from vdit_compile.layout import TokenLayout
from vdit_compile.masks.tile import TileMask, frame_masks
from vdit_compile.ops.cpu_fast import fast_attention, fast_attention_backward
from vdit_compile.ops.reference import (
    dense_masked_attention,
    reference_tile_attention,
    reference_tile_attention_backward,
)
from vdit_compile.runtime import cost_model as cm

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative L2 error

CASES = [  # (T, P, prefix, suffix, masks per head)
    (6, 8, 3, 2, ["g1w0", "dense", "g0w1", "g2w1"]),  # text both sides, per-head masks, a dense head
    (5, 4, 0, 0, ["g0w0", "g0w0"]),  # no text, no full row at all
    (4, 6, 5, 0, ["g1w1"]),  # one mask for every head, prefix only
    (7, 3, 0, 4, ["g0w2", "dense", "dense"]),  # suffix only
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(T, P, pre, suf, H, B=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = TokenLayout(T, P, 1, pre, suf)
    return lay, [torch.randn(B, H, lay.seq_len, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _masks(names, T):
    ms = [TileMask.parse(n) for n in names]
    return frame_masks(ms, T) if len(ms) > 1 else frame_masks(ms, T)[:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_and_dense_masked_sdpa(case, dtype):
    T, P, pre, suf, names = case
    H = max(len(names), 2)
    lay, (q, k, v) = _inputs(T, P, pre, suf, H, seed=len(names) + T)
    fm = _masks(names, T)
    out, lse = fast_attention(q.to(dtype), k.to(dtype), v.to(dtype), lay, fm, 0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    ref_out, ref_lse = reference_tile_attention(q, k, v, lay, fm, 0.3)
    dense = dense_masked_attention(q, k, v, lay, fm, 0.3)
    assert _rel(out, ref_out) < TOL[dtype] and _rel(out, dense) < TOL[dtype]
    assert (lse.double() - ref_lse).abs().max().item() < (1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:])
def test_backward_matches_reference_and_autograd_of_dense_masked_sdpa(case, dtype):
    T, P, pre, suf, names = case
    H = max(len(names), 2)
    lay, (q, k, v) = _inputs(T, P, pre, suf, H, seed=3 * T)
    fm = _masks(names, T)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    qc, kc, vc_ = (x.to(dtype) for x in (q, k, v))
    out, lse = fast_attention(qc, kc, vc_, lay, fm, 0.3)
    ref_out, ref_lse = reference_tile_attention(q, k, v, lay, fm, 0.3)
    # dense oracle: autograd through SDPA with the boolean mask (out term) and through logsumexp of the masked scores
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    dense_out = dense_masked_attention(qq, kk, vv, lay, fm, 0.3)
    ids = lay.frame_ids()
    keep = (fm.expand(H, T, T)[:, ids.clamp(min=0)][:, :, ids.clamp(min=0)] | (ids[:, None] < 0) | (ids[None, :] < 0))
    dense_lse = torch.logsumexp(((qq @ kk.transpose(-1, -2)) * 0.3).masked_fill(~keep, float("-inf")), -1)
    dense_grads = torch.autograd.grad((dense_out * dout).sum() + (dense_lse * dlse).sum(), (qq, kk, vv))
    for dl in (None, dlse):  # without and with the lse gradient
        got = fast_attention_backward(dout.to(dtype), None if dl is None else dl.float(), qc, kc, vc_, out, lse, lay, fm, 0.3)
        ref = reference_tile_attention_backward(dout, torch.zeros_like(dlse) if dl is None else dl, q, k, v,
                                                ref_out, ref_lse, lay, fm, 0.3)
        for a, b, name in zip(got, ref, "qkv"):
            assert a.dtype == dtype and a.shape == b.shape
            assert _rel(a, b) < 2 * TOL[dtype], (name, dl is None)
    for a, b, name in zip(got, dense_grads, "qkv"):
        assert _rel(a, b) < 2 * TOL[dtype], name


def test_op_runs_fast_path_on_cpu_and_opcheck():
    """The registered op's CPU path equals the fast module (float32) and keeps float64 on the reference."""
    from vdit_compile.ops.tile_attention import tile_attention  # noqa: F401  registers the op
    lay, (q, k, v) = _inputs(4, 4, 2, 0, 2, seed=11)
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    grid = [4, lay.height, lay.width, lay.height, lay.width]
    out, lse = torch.ops.vdit.tile_attention(q32, k32, v32, 2, 0, grid, "g1w0,dense", 0.25)
    fm = frame_masks([TileMask(1, 0), TileMask(dense=True)], 4)
    f_out, f_lse = fast_attention(q32.detach(), k32.detach(), v32.detach(), lay, fm, 0.25)
    assert torch.equal(out.detach(), f_out) and torch.equal(lse.detach(), f_lse)
    (out.sum() + lse.sum()).backward()
    ref = reference_tile_attention_backward(torch.ones_like(q), torch.ones_like(lse.double()), q, k, v,
                                            *reference_tile_attention(q, k, v, lay, fm, 0.25), lay, fm, 0.25)
    for a, b in zip((q32.grad, k32.grad, v32.grad), ref):
        assert _rel(a, b) < 1e-5
    torch.library.opcheck(torch.ops.vdit.tile_attention.default,
                          (q32.detach().requires_grad_(), k32.detach(), v32.detach(), 2, 0, grid, "g1w0,dense", 0.25))


def test_bad_inputs_are_explained():
    lay, (q, k, v) = _inputs(4, 4, 0, 0, 2)
    with pytest.raises(ValueError, match="CPU tensors of dtype"):
        fast_attention(q, k, v, lay, frame_masks([TileMask(0, 1)], 4), 0.3)  # float64: the reference's job
    with pytest.raises(ValueError, match="does not fit 2 heads x 4 frames"):
        fast_attention(q.float(), k.float(), v.float(), lay, frame_masks([TileMask(0, 1)] * 3, 4), 0.3)


# ---------------------------------------------------------------- cost model
class _Cfg:
    def __init__(self, mode):
        self.cost_model = mode


def test_cost_model_modes_and_reasons(monkeypatch):
    big = TokenLayout(8, 256, 1, 0, 0)  # 2048 tokens: measured under "auto"
    calls = []

    def fake_timing(sc):
        calls.append(sc)
        return cm.Timing(dense_s=1.0, sparse_s=0.5 if sc.kept_frames <= 2 else 0.95)

    monkeypatch.setattr(cm, "time_shape_class", fake_timing)
    model = cm.CostModel(maxsize=2)
    ok, why = cm.should_rewrite("cpu", torch.float32, big, 0.25, 4, 64, _Cfg("auto"), model)
    assert ok and "pays" in why and calls[-1].kept_frames == 2
    ok, why = cm.should_rewrite("cpu", torch.float32, big, 0.6, 4, 64, _Cfg("auto"), model)
    assert not ok and "left dense by the cost model" in why and "x1.05" in why
    cm.should_rewrite("cpu", torch.float32, big, 0.25, 4, 64, _Cfg("auto"), model)  # cached: no new timing
    assert len(calls) == 2 and len(model) == 2
    assert cm.should_rewrite("cpu", torch.float32, big, 0.6, 4, 64, _Cfg("always"), model)[0]  # override honoured
    assert cm.should_rewrite("cuda", torch.float32, big, 0.6, 4, 64, _Cfg("auto"), model)[0]
    tiny = TokenLayout(4, 16, 1, 8, 0)
    ok, why = cm.should_rewrite("cpu", torch.float32, tiny, 0.6, 2, 16, _Cfg("auto"), model)
    assert ok and "too small" in why and len(calls) == 2
    assert not cm.should_rewrite("cpu", torch.float32, tiny, 0.95, 2, 16, _Cfg("measure"), model)[0]
    with pytest.raises(ValueError, match="cost_model must be"):
        vc.OptimizeConfig(cost_model="sometimes")


def test_proxy_mask_has_the_density_asked_for():
    lay = TokenLayout(16, 8, 1, 10, 6)
    for kept in (1, 4, 8, 16):
        fm = cm.proxy_frame_mask(16, kept)
        assert (fm.sum(-1) == kept).all()
        from vdit_compile.masks.tile import mask_density
        assert cm.kept_frames_for(lay, mask_density(fm, lay)) == kept


def test_real_timing_runs_and_is_cached():
    """One real (small) measurement: both times positive, the second lookup is the cached object."""
    sc = cm.ShapeClass("cpu", "float32", 4, 32, 0, 0, 2, 16, 2)
    model = cm.CostModel()
    t = model.timing(sc)
    assert t.dense_s > 0 and t.sparse_s > 0 and model.timing(sc) is t


def test_cost_model_times_the_sites_own_masks(monkeypatch):
    """Given masks and a tile, the shape class carries the op's grid and masks arguments, and a real timing of
    them runs the op (text prefix included, per-head families on token tiles)."""
    from vdit_compile.masks.base import parse_mask

    calls = []
    monkeypatch.setattr(cm, "time_shape_class", lambda sc: calls.append(sc) or cm.Timing(dense_s=1.0, sparse_s=2.0))
    lay = TokenLayout(8, 16, 16, 24, 0)  # 2,072 tokens: measured under "auto"
    masks = [parse_mask("win3d-t1h1w1"), parse_mask("spatial-h0w0-g1"), parse_mask("g1w1"), parse_mask("dense")]
    ok, why = cm.should_rewrite("cpu", torch.float32, lay, 0.4, 4, 32, _Cfg("auto"), cm.CostModel(), tile=(4, 4),
                                masks=masks)
    assert not ok and "4 distinct head mask(s) on 4x4-token tiles" in why
    sc = calls[-1]
    assert sc.grid == (8, 16, 16, 4, 4) and sc.masks == "win3d-t1h1w1,spatial-h0w0-g1,g1w1,dense"
    monkeypatch.undo()
    small = cm.ShapeClass("cpu", "float32", 4, 32, 6, 0, 3, 16, 2, grid=(4, 8, 4, 4, 4),
                          masks="win3d-t1h1w1,spatial-h0w0-g1,g1w0")
    t = cm.time_shape_class(small)
    assert t.dense_s > 0 and t.sparse_s > 0


def test_state_records_the_cost_decision(monkeypatch):
    """optimize() with a uniform plan: a site the cost model rejects stays dense and its reason is recorded."""
    from core_models import build_tiny

    from vdit_compile.capture.install import state_of

    monkeypatch.setattr(cm, "MIN_MEASURED_FLOPS", 0.0)
    timed = []
    monkeypatch.setattr(cm, "time_shape_class", lambda sc: timed.append(sc) or cm.Timing(dense_s=1.0, sparse_s=2.0))
    model, kw = build_tiny("wan")
    with torch.no_grad():
        ref = model(**kw).sample
    vc.optimize(model, plan=TileMask(0, 0), backend="eager", progress=False)
    with torch.no_grad():
        out = model(**kw).sample
    st = state_of(model)
    assert st.rewritten == set() and st.cost_decisions
    assert all(not ok and "left dense by the cost model" in why for ok, why in st.cost_decisions.values())
    # the timing was of the site's own masks on its own grid, not of a density proxy
    assert timed and all(sc.masks == "g0w0" and len(sc.grid) >= 5 for sc in timed), timed
    assert torch.allclose(out, ref, atol=1e-5)
    vc.restore(model)
    vc.optimize(model, plan=TileMask(0, 0), backend="eager", progress=False, cost_model="always")
    with torch.no_grad():
        model(**kw)
    assert state_of(model).rewritten and all(ok for ok, _ in state_of(model).cost_decisions.values())
    vc.restore(model)


# ---------------------------------------------------------------- segments, strided runs, odd inputs
def _random_masks(H, T, g, empty_rows=False):
    """Per-head masks mixing every shape the planner tells apart: windows (runs), clamped bands (merged
    single-item runs), global frames + windows (gathered rest), random rows, and optionally empty rows."""
    f = torch.arange(T)
    band = cm.proxy_frame_mask(T, max(1, T // 2))[0]
    win = (f[None, :] - f[:, None]).abs() <= 1
    glob_win = win | (f[None, :] == 0)
    rand = torch.rand(T, T, generator=g) < 0.4
    masks = [band, win, glob_win, rand, torch.ones(T, T, dtype=torch.bool)]
    out = torch.stack([masks[h % len(masks)] for h in range(H)])
    if empty_rows:
        out[0, T // 2] = False
    return out


def _fast_vs_reference(lay, fm, q, k, v, dout, dlse, dtype, scale=0.3):
    qc, kc, vc_ = (x.to(dtype) for x in (q, k, v))
    out, lse = fast_attention(qc, kc, vc_, lay, fm, scale)
    ref_out, ref_lse = reference_tile_attention(q, k, v, lay, fm, scale)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert _rel(out, ref_out) < TOL[dtype]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)  # rows that keep nothing: -inf, as the reference
    assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() < (1e-5 if dtype == torch.float32 else 5e-2)
    for dl in (None, dlse):
        got = fast_attention_backward(dout.to(dtype), dl, qc, kc, vc_, out, lse, lay, fm, scale)
        ref = reference_tile_attention_backward(dout, torch.zeros_like(dlse) if dl is None else dl, q, k, v,
                                                ref_out, ref_lse, lay, fm, scale)
        for a, b, name in zip(got, ref, "qkv"):
            assert a.dtype == dtype and a.shape == b.shape and torch.isfinite(a).all()
            assert _rel(a, b) < 2 * TOL[dtype], (name, dl is None)


def _fast_vs_reference_at(threads, lay, fm, g, dtype):
    """:func:`_fast_vs_reference` on fresh random inputs with ``threads`` torch threads (restored after)."""
    q, k, v, dout = (torch.randn(2, fm.shape[0], lay.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(4))
    dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _fast_vs_reference(lay, fm, q, k, v, dout, dlse, dtype)
        assert torch.get_num_threads() == threads  # the bookkeeping's single thread is undone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T, P, pre, suf, H, empty", [
    (8, 5, 0, 0, 5, False),  # odd tokens per frame, no text: every head shape, heads differ
    (7, 3, 4, 0, 5, True),  # prefix only, a row that keeps nothing (text keys only)
    (6, 4, 0, 3, 6, False),  # suffix only
    (9, 2, 3, 2, 5, True),  # both text sides
    (5, 7, 0, 0, 2, True),  # no text and a row that keeps nothing: out 0, lse -inf
])
def test_segments_and_runs_match_reference_on_random_masks(T, P, pre, suf, H, empty, threads, dtype):
    g = torch.Generator().manual_seed(T * 100 + P * 10 + H)
    lay = TokenLayout(T, P, 1, pre, suf)
    fm = _random_masks(H, T, g, empty_rows=empty)
    _fast_vs_reference_at(threads, lay, fm, g, dtype)


def test_band_masks_need_no_gather_and_few_calls():
    """A band (the clamped ends keep the same frames) is one window call plus one call for both ends."""
    from vdit_compile.ops.cpu_fast import _plan
    plan = _plan(cm.proxy_frame_mask(16, 8), 4, 16, 2)
    assert not plan.rest and plan.empty is None and len(plan.runs) == 2
    win, ends = sorted(plan.runs, key=lambda r: r.n, reverse=True)
    assert (win.n, win.qn, win.kstep, win.kn) == (8, 1, 1, 8)
    assert (ends.n, ends.q0, ends.qstep, ends.qn, ends.k0, ends.kstep) == (2, 0, 12, 4, 0, 8)
    one_head = _plan(torch.ones(1, 6, 6, dtype=torch.bool), 1, 6, 2).runs  # dense, one head: split for 2 threads
    assert [(r.n, r.qn, r.kstep) for r in one_head] == [(2, 3, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pre, suf", [(0, 0), (3, 2)])
def test_query_frames_that_keep_the_same_keys_share_one_gather(pre, suf, threads, dtype):
    """A spatial window across time in unit space (2 x 2 units per frame, keep the units of the same column in every
    frame): half the query units keep the same non-contiguous key units; they form one item with its keys gathered
    once, split only as far as the threads need; forward and backward still match the reference."""
    from vdit_compile.ops.cpu_fast import _plan
    T, H = 16, 3  # 4 frames x 4 units
    u = torch.arange(T)
    col = u % 2
    same_col = col[:, None] == col[None, :]  # (T, T): not one range of units
    every_other = (u[None, :] % 2 == 0).expand(T, T)  # every query keeps the even units: one item of all 16
    fm = torch.stack([same_col, every_other, same_col | (u[None, :] < 2)])
    plan = _plan(fm, H, T, threads)
    assert not plan.runs and plan.empty is None
    pairs = sorted((int(h), int(f)) for g in plan.rest for h, fs in zip(g.heads, g.qframes) for f in fs)
    assert pairs == [(h, f) for h in range(H) for f in range(T)]  # every (head, query unit) pair exactly once
    assert sum(g.heads.numel() for g in plan.rest) < H * T  # fewer key gathers than pairs
    for g in plan.rest:  # each item's query units keep exactly its key units
        for h, fs, ks in zip(g.heads, g.qframes, g.kframes):
            assert all(fm[h, f].nonzero().flatten().tolist() == ks.tolist() for f in fs)
    head0 = [(g.qframes.shape[1], g.kframes.shape[1]) for g in plan.rest for h in g.heads if h == 0]
    assert sum(m for m, _ in head0) == T and all(c == 8 for _, c in head0)
    g1 = next(g for g in plan.rest if 1 in g.heads.tolist())  # head 1: one key set for all 16 query units,
    assert g1.heads.tolist() == [1] * g1.heads.numel()  # chunked into the fewest items that feed every thread
    assert g1.heads.numel() == next(d for d in range(1, T + 1) if T % d == 0 and d >= threads)
    g = torch.Generator().manual_seed(11 + threads)
    lay = TokenLayout(T, 5, 1, pre, suf)
    _fast_vs_reference_at(threads, lay, fm, g, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pre, suf", [(0, 0), (3, 2)])
def test_masks_constant_on_unit_blocks_run_on_merged_frames(pre, suf, dtype):
    """A 3D window that covers whole frames of 2 x 2 units is a frame band in unit space: the op merges each frame's
    4 units into one frame of 4x the tokens (exact: consecutive units are contiguous rows) and runs strided windows;
    a mask that is not block-constant is left as it is; both match the reference."""
    from vdit_compile.ops.cpu_fast import _coarsen
    Tf, per = 6, 4  # 6 frames x 4 units of 5 tokens
    f = torch.arange(Tf * per) // per
    band = (f[:, None] - f[None, :]).abs() <= 1
    fm = torch.stack([band, torch.ones_like(band), band & (f[None, :] >= 0)])
    lay = TokenLayout(Tf * per, 5, 1, pre, suf)
    small, big = _coarsen(fm, lay)
    assert (big.num_frames, big.frame_tokens, big.text_prefix, big.text_suffix) == (Tf, 5 * per, pre, suf)
    assert torch.equal(small, ((torch.arange(Tf)[:, None] - torch.arange(Tf)[None, :]).abs() <= 1)
                       .expand(3, Tf, Tf) | torch.tensor([False, True, False])[:, None, None])
    odd = fm.clone()
    odd[0, 0, per] = False  # one unit pair differs from its block: no merge
    assert _coarsen(odd, lay)[1] is lay
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 3, lay.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(4))
    dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    _fast_vs_reference(lay, fm, q, k, v, dout, dlse, dtype)
    _fast_vs_reference(lay, odd, q, k, v, dout, dlse, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    """q, k, v as transposes of (B, L, H, D) tensors (what a model's attention passes): read in place."""
    g = torch.Generator().manual_seed(5)
    lay = TokenLayout(6, 4, 1, 3, 2)
    H = 4
    fm = _random_masks(H, 6, g)
    q, k, v, dout = (torch.randn(2, lay.seq_len, H, 8, generator=g, dtype=torch.float64).transpose(1, 2)
                     for _ in range(4))
    dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    _fast_vs_reference(lay, fm, q, k, v, dout, dlse, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mask_family_through_the_op(dtype):
    """The registered op (CPU fast path) against each family's element-level oracle, forward and backward."""
    from family_cases import FAMILY_CASES, case_args, element_oracle

    from vdit_compile.ops.tile_attention import tile_attention  # noqa: F401  registers the op
    for i, (lay, tile, names) in enumerate(FAMILY_CASES):
        g = torch.Generator().manual_seed(40 + i)
        H = len(names)
        q, k, v, dout = (torch.randn(2, H, lay.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(4))
        dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        ref_out, ref_lse = element_oracle(qq, kk, vv, lay, tile, names, 0.3)
        ref = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (qq, kk, vv))
        qc, kc, vc_ = (x.to(dtype).requires_grad_() for x in (q, k, v))
        out, lse = torch.ops.vdit.tile_attention(qc, kc, vc_, *case_args(lay, tile, names), 0.3)
        assert _rel(out, ref_out) < TOL[dtype], names
        assert (lse.double() - ref_lse).abs().max().item() < (1e-5 if dtype == torch.float32 else 5e-2), names
        got = torch.autograd.grad((out * dout.to(dtype)).sum() + (lse * dlse.float()).sum(), (qc, kc, vc_))
        for a, b, name in zip(got, ref, "qkv"):
            assert _rel(a, b) < 2 * TOL[dtype], (names, name)


def test_bookkeeping_runs_on_one_thread_of_the_caller_only(monkeypatch):
    """The op's copies run on one thread of the calling thread (OpenMP and MKL counts), and nothing else changes:
    during them a thread that starts torch work sees the process's thread count (torch.set_num_threads would give
    it one thread, for good), the kernels get the caller's threads, and the caller gets its counts back, also when
    a kernel fails."""
    from vdit_compile.ops import cpu_fast, threads

    if threads._omp() is None:
        pytest.skip("torch's OpenMP runtime cannot be reached here: the bookkeeping keeps the caller's threads")
    import threading

    seen = {"bookkeeping": [], "fresh": [], "kernel": [], "mkl_bookkeeping": [], "mkl_kernel": []}
    mkl_threads = threads._symbol("MKL_Get_Max_Threads") if threads._mkl() is not None else lambda: None

    def fresh_thread_count():
        t = threading.Thread(target=lambda: seen["fresh"].append(torch.get_num_threads()))
        t.start()
        t.join()

    text_rows, flash = cpu_fast._text_rows, cpu_fast._FLASH

    def observed_text_rows(layout):  # called inside the op, outside the kernels
        seen["bookkeeping"].append(torch.get_num_threads())
        seen["mkl_bookkeeping"].append(mkl_threads())
        fresh_thread_count()
        return text_rows(layout)

    def observed_flash(*args, **kw):
        seen["kernel"].append(torch.get_num_threads())
        seen["mkl_kernel"].append(mkl_threads())
        return flash(*args, **kw)

    monkeypatch.setattr(cpu_fast, "_text_rows", observed_text_rows)
    monkeypatch.setattr(cpu_fast, "_FLASH", observed_flash)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lay, (q, k, v) = _inputs(5, 4, 2, 1, 3, B=1)
        fm = _masks(["g1w0", "g0w1", "dense"], 5)
        out, _ = fast_attention(q.float(), k.float(), v.float(), lay, fm, 0.3)
        assert _rel(out, reference_tile_attention(q, k, v, lay, fm, 0.3)[0]) < TOL[torch.float32]
        assert seen["bookkeeping"] == [1] and seen["fresh"] == [2] and set(seen["kernel"]) == {2}
        assert torch.get_num_threads() == 2
        if threads._mkl() is not None:  # MKL's own count of this thread (its vector math threads itself) likewise
            assert seen["mkl_bookkeeping"] == [1] and set(seen["mkl_kernel"]) == {2} and mkl_threads() == 2

        def failing(*args, **kw):
            raise RuntimeError("kernel failed")

        monkeypatch.setattr(cpu_fast, "_FLASH", failing)
        with pytest.raises(RuntimeError, match="kernel failed"):
            fast_attention(q.float(), k.float(), v.float(), lay, fm, 0.3)
        assert torch.get_num_threads() == 2 and mkl_threads() in (2, None)
    finally:
        torch.set_num_threads(before)


def test_without_an_openmp_runtime_the_bookkeeping_keeps_the_callers_threads(monkeypatch):
    from vdit_compile.ops import threads

    monkeypatch.setattr(threads, "_omp", lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(9)
        lay = TokenLayout(6, 3, 1, 2, 2)
        fm = _random_masks(5, 6, g, empty_rows=True)
        q, k, v, dout = (torch.randn(1, 5, lay.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(4))
        _fast_vs_reference(lay, fm, q, k, v, dout, torch.randn(q.shape[:3], generator=g, dtype=torch.float64),
                           torch.float32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
