"""The attention op (every mask family) against dense SDPA with the family's element-level boolean mask.

The oracle is independent of the op's machinery: ``MaskSpec.element_mask`` evaluates the family's rule
on token coordinates in the model's own order, while the op reorders tokens into tiles, builds unit
masks and runs the gather reference in unit space.
"""
import pytest
import torch
from torch.library import opcheck

from vdit_compile import SpatialWindow, TileMask, TokenLayout, Window3D, parse_mask
from vdit_compile.masks import UnitGrid, choose_tile, known_families
from vdit_compile.masks.tile import frame_masks, mask_density
from vdit_compile.ops import dense_masked_attention, tile_attention_out
from vdit_compile.ops.args import encode_masks, op_grid

FAMILY_CASES = [
    # layout, tile, per-head masks (text prefix/suffix, odd H/W, T not divisible by the window, mixed families)
    (TokenLayout(5, 3, 4, text_prefix=3, text_suffix=2), None, [TileMask(1, 0), TileMask(dense=True), TileMask(0, 1)]),
    (TokenLayout(4, 2, 2), None, [TileMask(0, 0)]),
    (TokenLayout(1, 4, 4, text_suffix=5), None, [TileMask(0, 0), TileMask(2, 1)]),
    (TokenLayout(6, 1, 3, text_prefix=4), None, [TileMask(2, 0), TileMask(0, 2)]),
    (TokenLayout(5, 6, 4, text_prefix=3, text_suffix=2), (3, 2), [Window3D(1, 0, 1), SpatialWindow(0, 0), TileMask(1, 0)]),
    (TokenLayout(7, 5, 3, text_suffix=4), (5, 1), [Window3D(2, 1, 0, g=1), SpatialWindow(0, 1, g=1)]),
    (TokenLayout(3, 4, 6, text_prefix=2), (2, 3), [SpatialWindow(1, 0), TileMask(dense=True), Window3D(0, 0, 0)]),
    # frame-minor tokens ((H, W, T) order): reordered into frame-major tiles around the computation
    (TokenLayout(4, 2, 3, text_prefix=2, text_suffix=1, order="HWT"), None, [TileMask(1, 0), TileMask(0, 0)]),
    (TokenLayout(5, 4, 2, text_suffix=3, order="HWT"), (2, 1), [Window3D(1, 0, 0), SpatialWindow(0, 0, g=1)]),
]


def _inputs(layout, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, layout.seq_len, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _oracle(q, k, v, layout, tile, masks, scale):
    grid = UnitGrid(layout.num_frames, layout.height, layout.width, *(tile or (layout.height, layout.width)),
                    frame_minor=layout.order == "HWT")
    em = torch.stack([m.element_mask(layout, grid) for m in masks])[None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=em, scale=scale)


@pytest.mark.parametrize("layout,tile,masks", FAMILY_CASES)
def test_forward_and_grads_match_dense_masked_sdpa(layout, tile, masks):
    q, k, v = _inputs(layout, len(masks), torch.float64, seed=layout.seq_len)
    ref = _oracle(q, k, v, layout, tile, masks, 0.37)
    out = tile_attention_out(q, k, v, layout, masks, 0.37, tile)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_frame_oracle_agrees_with_element_oracle():
    layout, _, masks = FAMILY_CASES[0]
    q, k, v = (t.detach() for t in _inputs(layout, 3, torch.float64, seed=3))
    a = dense_masked_attention(q, k, v, layout, frame_masks(masks, layout.num_frames), 0.3)
    torch.testing.assert_close(a, _oracle(q, k, v, layout, None, masks, 0.3))


def test_frame_minor_oracle_follows_the_frames():
    """The HWT element mask keeps exactly the token pairs whose frames (token index mod T) the frame mask keeps."""
    layout, tile, masks = FAMILY_CASES[7]
    grid = UnitGrid(4, 2, 3, 2, 3, frame_minor=True)
    em = masks[0].element_mask(layout, grid)
    f = layout.frame_ids()
    vid = f >= 0
    fm = masks[0].frame_mask(4)
    assert torch.equal(em[vid][:, vid], fm[f[vid]][:, f[vid]])
    assert bool((f[vid] == torch.arange(24) % 4).all())


@pytest.mark.parametrize("case", [0, 4, 5, 8])
def test_lse_gradient_and_opcheck(case):
    layout, tile, masks = FAMILY_CASES[case]
    layout = layout.with_frames(3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, len(masks), layout.seq_len, 3, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    args = (layout.text_prefix, layout.text_suffix, op_grid(layout, tile), encode_masks(masks), 0.3)
    # both outputs (out and lse) are checked, so the lse gradient path is exercised
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.vdit.tile_attention(q, k, v, *args), (q, k, v), fast_mode=True)
    opcheck(torch.ops.vdit.tile_attention.default, (q, k, v, *args))


@pytest.mark.parametrize("case", [0, 4])
def test_fp32_and_compile(case):
    layout, tile, masks = FAMILY_CASES[case]
    q, k, v = (t.detach().float() for t in _inputs(layout, len(masks), torch.float64, seed=2))
    grid, names = op_grid(layout, tile), encode_masks(masks)
    pre, suf = layout.text_prefix, layout.text_suffix
    fn = torch.compile(lambda q, k, v: torch.ops.vdit.tile_attention(q, k, v, pre, suf, grid, names, 0.3)[0] * 2,
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), 2 * _oracle(q, k, v, layout, tile, masks, 0.3), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_explained():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="10 video tokens, but the grid"):
        torch.ops.vdit.tile_attention(q, q, q, 0, 0, [3, 1, 1, 1, 1], "g0w0", 1.0)
    with pytest.raises(ValueError, match="3 masks for 2 heads"):
        torch.ops.vdit.tile_attention(q, q, q, 0, 0, [2, 5, 1, 5, 1], "g0w0,g0w0,dense", 1.0)
    with pytest.raises(ValueError, match="does not divide"):
        torch.ops.vdit.tile_attention(q, q, q, 0, 0, [2, 5, 1, 2, 1], "win3d-t1h1w1", 1.0)
    with pytest.raises(ValueError, match="unknown mask 'box3'") as info:
        torch.ops.vdit.tile_attention(q, q, q, 0, 0, [2, 5, 1, 5, 1], "box3", 1.0)
    assert all(f"{fam}: '" in str(info.value) for fam in ("tile", "win3d", "spatial"))


def test_names_round_trip_and_errors():
    for m in [TileMask(2, 1), TileMask(dense=True), Window3D(1, 2, 3), Window3D(0, 1, 1, g=2), SpatialWindow(1, 0),
              SpatialWindow(2, 2, g=1)]:
        assert parse_mask(m.name) == m
    assert set(known_families()) >= {"tile", "win3d", "spatial"}
    with pytest.raises(ValueError, match="unknown mask 'g1'"):
        TileMask.parse("g1")
    with pytest.raises(ValueError, match="is a win3d mask"):
        TileMask.parse("win3d-t1h1w1")
    with pytest.raises(ValueError, match="integer >= 0, found -1"):
        Window3D(-1, 0, 0)
    with pytest.raises(TypeError, match="integer >= 0, found 1.5 \\(float\\)"):
        TileMask(1.5, 0)


def test_family_rules():
    m = TileMask(1, 1).frame_mask(5)
    assert m[0].all() and m[:, 0].all()  # reference frame: full row and column
    assert m[3].tolist() == [True, False, True, True, True]
    grid = UnitGrid(4, 8, 8, 2, 2)  # 4 x 4 tiles per frame
    um = Window3D(0, 1, 1).unit_mask(grid)
    c = grid.unit_coords()
    corner = int(((c[:, 0] == 0) & (c[:, 1] == 0) & (c[:, 2] == 0)).nonzero())
    kept = c[um[corner]]
    # border: the 3x3 box is shifted inside the grid, so the corner tile keeps tiles rows 0..2, cols 0..2, frame 0
    assert kept[:, 0].unique().tolist() == [0] and kept[:, 1].unique().tolist() == [0, 1, 2]
    assert kept[:, 2].unique().tolist() == [0, 1, 2] and um[corner].sum() == 9
    sp = SpatialWindow(0, 0).unit_mask(grid)  # same tile in every frame
    assert sp.sum(1).eq(4).all() and sp[corner][c[:, 1].eq(0) & c[:, 2].eq(0)].all()
    g = Window3D(0, 0, 0, g=1).unit_mask(grid)
    assert g[c[:, 0] == 0].all() and g[:, c[:, 0] == 0].all()


def test_density():
    layout = TokenLayout(4, 2, 2, text_prefix=2)
    assert mask_density(TileMask(dense=True).frame_mask(4), layout) == pytest.approx(1.0)
    # own frame only: 4 tiles of 4x4 video + text rows/cols of an 18-token sequence
    expected = (4 * 16 + 2 * 2 * 18 - 4) / 18**2
    assert mask_density(TileMask(0, 0).frame_mask(4), layout) == pytest.approx(expected)
    grid = UnitGrid(4, 2, 2, 1, 1)
    assert TileMask(0, 0).density(layout, grid) == pytest.approx(expected)
    em = SpatialWindow(0, 0).element_mask(layout, grid)
    assert SpatialWindow(0, 0).density(layout, grid) == pytest.approx(em.double().mean().item())


def test_choose_tile_divides():
    assert choose_tile(48, 80, 128) in {(8, 16), (16, 8)}
    assert choose_tile(8, 8, 16) == (4, 4)
    th, tw = choose_tile(45, 7, 64)
    assert 45 % th == 0 and 7 % tw == 0
    assert choose_tile(4, 4, 100) == (4, 4)
