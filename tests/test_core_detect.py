"""Detection of hand-written attention forms and of the token grid (issue 3, part 3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_models import build_tiny

from vdit_compile.passes.attention import find_attention
from vdit_compile.passes.grid import infer_grid

Q = torch.randn(2, 3, 10, 8)
K = torch.randn(2, 3, 10, 8)
V = torch.randn(2, 3, 10, 8)


def _graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


FORMS = {
    "matmul": (lambda q, k, v: torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.5, dim=-1) @ v, 0.5),
    "div": (lambda q, k, v: (q @ k.transpose(2, 3) / 4.0).softmax(-1) @ v, 0.25),
    "einsum": (lambda q, k, v: torch.einsum("bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", q, k).mul(0.3).softmax(-1), v), 0.3),
    "bmm": (lambda q, k, v: torch.bmm(F.softmax(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).permute(0, 2, 1)) * 0.2, dim=-1),
                                      v.flatten(0, 1)), 0.2),
    "baddbmm": (lambda q, k, v: torch.bmm(torch.baddbmm(torch.zeros(6, 10, 10), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                                        beta=0, alpha=0.7).float().softmax(-1), v.flatten(0, 1)), 0.7),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.4), 0.4),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_attention_forms_found_with_scale(form):
    fn, scale = FORMS[form]
    gm = _graph(fn, Q, K, V)
    matches = find_attention(gm)
    assert len(matches) == 1
    m = matches[0]
    assert m.scale == pytest.approx(scale) and not m.problems
    assert m.mask is None
    # the matched q/k/v feed the output node
    assert m.out in m.v.users or any(m.out in u.users for u in m.v.users) or m.out.args[1] is m.v


def test_problems_are_reported():
    gm = _graph(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), Q, K, V)
    assert find_attention(gm)[0].problems == ["causal attention"]
    gm = _graph(lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True), Q, K, V)
    assert "grouped-query" in find_attention(gm)[0].problems[0]


def test_softmax_that_is_not_attention_is_ignored():
    gm = _graph(lambda q, k, v: torch.softmax(q * 2, -1) @ v.transpose(-1, -2), Q, K, V)
    assert find_attention(gm) == []


@pytest.mark.parametrize("name,expected", [
    ("wan", (4, 4, 4, "BCTHW")), ("cogvideox", (4, 4, 4, "BTCHW")), ("kandinsky5", (4, 4, 4, "BTHWC")),
    ("ltx", (4, 4, 4, "BNC")), ("cogvideox15", (4, 4, 4, "BTCHW")), ("temporal", (4, 8, 8, "(BT)CHW")),
])
def test_token_grid_from_inputs_and_config(name, expected):
    model, kw = build_tiny(name)
    grid, why = infer_grid(model, (), kw)
    assert grid is not None, why
    assert (grid.frames, grid.height, grid.width) == expected[:3] and expected[3] in grid.source


def test_ambiguous_channel_axis_is_marked_guessed_or_refused():
    """channels == frames: a Conv3d patch embedding gives a *guessed* BCTHW grid (the probe must confirm it:
    tests/test_core_ambiguous_grid.py); without one (CogVideoX patchifies with a Conv2d) no grid at all."""
    model, kw = build_tiny("wan")
    c = model.config.in_channels
    x = torch.randn(1, c, c, 8, 8)  # BCTHW or BTCHW?
    grid, why = infer_grid(model, (), dict(kw, hidden_states=x))
    assert grid is not None and grid.axes == "BCTHW" and "channel axis 1 assumed" in grid.guessed
    unambiguous, _ = infer_grid(model, (), kw)
    assert unambiguous is not None and unambiguous.guessed == ""
    model, kw = build_tiny("cogvideox")
    c = model.config.in_channels
    grid, why = infer_grid(model, (), dict(kw, hidden_states=torch.randn(1, c, c, 8, 8)))
    assert grid is None and "channel axis" in why


def test_token_order_probe_rejects_non_frame_major():
    """Same shapes, same cat, but tokens ordered W, T, H: the probe notices; the site stays dense."""
    from core_models import ManualDiT

    import vdit_compile as vc

    _, kw = build_tiny("manual")
    torch.manual_seed(0)
    sites = vc.inspect_model(ManualDiT(order="WTH").eval(), kw)
    assert len(sites) == 2 and not any(s.tileable for s in sites)
    assert all("token-order probe" in s.reason and "not frame-major" in s.reason for s in sites)
    torch.manual_seed(0)
    assert all(s.tileable for s in vc.inspect_model(ManualDiT().eval(), kw))


def test_frame_minor_tokens_are_tiled_and_match_the_oracle():
    """Tokens ordered H, W, T (frame index fastest): the probe confirms them frame-minor, the op reorders them,
    and the optimised model equals the masked-dense oracle on an unseen input."""
    from core_models import ManualDiT, reference_output, rel_err

    import vdit_compile as vc

    _, kw = build_tiny("manual")
    torch.manual_seed(0)
    model = ManualDiT(order="HWT").eval()
    sites = vc.inspect_model(model, kw)
    assert len(sites) == 2 and all(s.tileable and s.layout.order == "HWT" for s in sites)
    mask = vc.TileMask(0, 0)
    unseen = {k: (v + 0.3 * torch.randn_like(v) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kw.items()}
    with torch.no_grad():
        dense = model(**unseen)
        ref = reference_output("manual", model, unseen, sites, mask)
        try:
            vc.optimize(model, plan=mask, cost_model="always")
            model(**kw)
            out = model(**unseen)
        finally:
            vc.restore(model)
    assert rel_err(out, ref) < 1e-5 and rel_err(out, dense) > 1e-4


def _classify(fn, grid, *args):
    from vdit_compile.passes.detect import classify, dataflow_graph

    graphs = []
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm.forward, dynamic=False, fullgraph=True)(*args)
    gm = graphs[-1]  # static shapes: this call's lengths, not a symbol shared with an earlier call
    return classify(find_attention(gm)[0], grid, "no grid in this test", dataflow_graph(gm))


def test_classify_returns_a_typed_classification():
    import dataclasses

    from vdit_compile.kinds import SiteKind
    from vdit_compile.passes.detect import Classification
    from vdit_compile.passes.grid import GridInfo

    sdpa = FORMS["sdpa"][0]
    grid = GridInfo(2, 10, 1, 1, "test")  # 10 frames of one token: the 10 tokens are the video
    c = _classify(sdpa, grid, Q, K, V)
    assert isinstance(c, Classification) and c.kind is SiteKind.VIDEO_SELF and c.kind.tileable
    assert (c.layout.num_frames, c.heads, c.head_dim, c.merged, c.reason, c.video) == (10, 3, 8, False, "", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kind = SiteKind.OTHER
    assert _classify(sdpa, GridInfo(2, 5, 2, 1, "test"), Q[..., :2, :], K[..., :2, :], V[..., :2, :]).kind is SiteKind.SPATIAL
    none = _classify(sdpa, None, Q, K, V)
    assert none.kind is SiteKind.OTHER and none.layout is None and "no grid in this test" in none.reason
    # more tokens than the video and no cat to split them: 3D attention left dense, flagged by a field
    joint = _classify(sdpa, GridInfo(2, 4, 2, 1, "test"), Q, K, V)
    assert joint.kind is SiteKind.OTHER and joint.video and joint.layout is None


def test_dense_3d_is_read_from_typed_fields_not_from_the_reason():
    from vdit_compile.capture.backend import is_dense_3d
    from vdit_compile.kinds import SiteKind
    from vdit_compile.passes.detect import AttentionSite

    assert is_dense_3d(AttentionSite("a", SiteKind.OTHER, None, 2, 8, reason="anything at all", video=True))
    assert not is_dense_3d(AttentionSite("a", SiteKind.OTHER, None, 2, 8, reason="3D attention, joint attention"))
    assert is_dense_3d(AttentionSite("a", SiteKind.JOINT_TEXT_SUFFIX, None, 2, 8))
    assert str(SiteKind.VIDEO_SELF) == f"{SiteKind.VIDEO_SELF}" == "video_self" == SiteKind.VIDEO_SELF
