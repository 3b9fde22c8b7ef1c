"""The tile-attention op's CPU reference against dense SDPA with the equivalent boolean mask."""
import pytest
import torch
from torch.library import opcheck

from vdit_compile import TileMask, TokenLayout
from vdit_compile.masks.tile import frame_masks, mask_density, op_mask_args
from vdit_compile.ops import dense_masked_attention, tile_attention_out

CASES = [
    (TokenLayout(5, 3, 4, text_prefix=3, text_suffix=2), [TileMask(1, 0), TileMask(dense=True), TileMask(0, 1)]),
    (TokenLayout(4, 2, 2), [TileMask(0, 0)]),
    (TokenLayout(1, 4, 4, text_suffix=5), [TileMask(0, 0), TileMask(2, 1)]),
    (TokenLayout(6, 1, 3, text_prefix=4), [TileMask(2, 0), TileMask(0, 2)]),
]


def _inputs(layout, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, layout.seq_len, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("layout,masks", CASES)
def test_forward_and_grads_match_dense_masked_sdpa(layout, masks):
    q, k, v = _inputs(layout, len(masks), torch.float64, seed=layout.seq_len)
    g, w = op_mask_args(masks)
    ref = dense_masked_attention(q, k, v, layout, frame_masks(masks, layout.num_frames), 0.37)
    out = tile_attention_out(q, k, v, layout.text_prefix, layout.text_suffix, layout.num_frames, g, w, 0.37)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lse_gradient_and_opcheck():
    layout, masks = TokenLayout(3, 1, 2, text_prefix=1, text_suffix=1), [TileMask(1, 0), TileMask(0, 0)]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    gs, ws = op_mask_args(masks)
    args = (layout.text_prefix, layout.text_suffix, layout.num_frames, gs, ws, 0.3)
    # both outputs (out and lse) are checked, so the lse gradient path is exercised
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.vdit.tile_attention(q, k, v, *args), (q, k, v), fast_mode=True)
    opcheck(torch.ops.vdit.tile_attention.default, (q, k, v, *args))


def test_fp32_and_compile():
    layout, masks = CASES[0]
    q, k, v = (t.detach().float() for t in _inputs(layout, 3, torch.float64, seed=2))
    g, w = op_mask_args(masks)
    fn = torch.compile(lambda q, k, v: torch.ops.vdit.tile_attention(q, k, v, 3, 2, 5, g, w, 0.3)[0] * 2, fullgraph=True, backend="eager")
    ref = dense_masked_attention(q, k, v, layout, frame_masks(masks, 5), 0.3)
    torch.testing.assert_close(fn(q, k, v), 2 * ref, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_explained():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="cannot be split into 3 equal frames"):
        tile_attention_out(q, q, q, 0, 0, 3, [0], [0], 1.0)
    with pytest.raises(ValueError, match="one \\(global_frames, window\\) pair per head"):
        tile_attention_out(q, q, q, 0, 0, 2, [0, 0, 0], [0, 0, 0], 1.0)


def test_mask_family_rules_and_density():
    m = TileMask(1, 1).frame_mask(5)
    assert m[0].all() and m[:, 0].all()  # reference frame: full row and column
    assert m[3].tolist() == [True, False, True, True, True]
    assert TileMask.parse("g2w1") == TileMask(2, 1) and TileMask.parse("dense").dense
    with pytest.raises(ValueError, match="unknown tile mask name"):
        TileMask.parse("g1")
    layout = TokenLayout(4, 2, 2, text_prefix=2)
    dense = TileMask(dense=True).frame_mask(4)
    assert mask_density(dense, layout) == pytest.approx(1.0)
    # own frame only: 4 tiles of 4x4 video + text rows/cols of an 18-token sequence
    expected = (4 * 16 + 2 * 2 * 18 - 4) / 18**2
    assert mask_density(TileMask(0, 0).frame_mask(4), layout) == pytest.approx(expected)
