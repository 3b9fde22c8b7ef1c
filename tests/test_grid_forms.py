"""Real models' inputs that hide the video grid (issue 22): each form is rewritten and matches its oracle.

Forms (small DiTs in tests/grid_models.py): conditioning channels concatenated to the latents
(config names the latent channels, or the concatenated count the model reads), channels equal to
frames with ``(B, F, C, H, W)`` latents (per-frame Conv2d and diffusers' CogVideoX; a Conv3d after a
permute is in tests/test_core_ambiguous_grid.py), a linear-attention + temporal-conv block before the softmax attention, and
the video inside a list (batched and unbatched).  Each is compiled on one input and checked on
another (unseen) input against the masked-dense oracle: the original model with dense attention
under the equivalent boolean mask.  Where refusing is right (several videos packed into one
sequence, 2-D packed patches, tokens not frame-major), the message is asserted.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from core_models import (
    TEXT,
    ManualDiT,
    MaskedSDPA,
    _text,
    out_of,
    reference_output,
    rel_err,
)
from grid_models import (
    F_,
    HH,
    WW,
    C,
    CondConcatBlockBreakDiT,
    CondConcatBreakDiT,
    CondConcatDiT,
    FramesFirstDiT,
    ListInputDiT,
    MixingDiT,
    PackedPatchesDiT,
)

import vdit_compile as vc
from vdit_compile import TileMask
from vdit_compile.capture import state_of
from vdit_compile.passes.grid import channel_counts, grid_candidates, infer_grid

MASK = TileMask(1, 0)


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cond_inputs(seed):
    return {"hidden_states": _r(1, 2 * C + 1, F_, HH, WW, seed=seed), "encoder_hidden_states": _text(24, seed=seed + 1)}


def _cond_internal_inputs(seed):
    return {"hidden_states": _r(1, C, F_, HH, WW, seed=seed), "condition": _r(1, C + 1, F_, HH, WW, seed=seed + 1),
                "encoder_hidden_states": _text(24, seed=seed + 2)}


def _frames_first_inputs(seed):  # C == F: 4 channels at 4 latent frames, (B, F, C, H, W)
    return {"hidden_states": _r(1, 4, 4, HH, WW, seed=seed), "encoder_hidden_states": _text(24, seed=seed + 1)}


def _video_inputs(seed):
    return {"hidden_states": _r(1, C, F_, HH, WW, seed=seed), "encoder_hidden_states": _text(24, seed=seed + 1)}


def _list_inputs(seed, unbatched=False):
    v = _r(1, C, F_, HH, WW, seed=seed)
    return {"vision_tokens": [v[0] if unbatched else v], "encoder_hidden_states": _text(24, seed=seed + 1)}


#: name -> (model factory, inputs(seed), expected (T', H', W', text prefix), layout read from)
FORMS = {
    "cond_concat": (lambda: CondConcatDiT(), _cond_inputs, (F_, 4, 4, TEXT), "BCTHW"),
    # 4 latent frames = the config's 4 latent channels, input 2x4+1: the axis equal to in_channels is wrong
    "cond_concat_frames_equal_latent_channels": (lambda: CondConcatDiT(), lambda s: {**_cond_inputs(s), "hidden_states": _r(
        1, 2 * C + 1, C, HH, WW, seed=s)}, (C, 4, 4, TEXT), "BCTHW"),
    "cond_concat_graph_break": (lambda: CondConcatBreakDiT(), lambda s: dict(_cond_inputs(s), encoder_hidden_states=None),
                                (F_, 4, 4, 0), "BCTHW"),  # video self-attention: a block graph holds no text cat
    "cond_concat_block_graphs": (lambda: CondConcatBlockBreakDiT(), lambda s: dict(_cond_inputs(s), encoder_hidden_states=None),
                                 (F_, 4, 4, 0), "BCTHW"),
    "cond_internal": (lambda: CondConcatDiT(internal=True), _cond_internal_inputs, (F_, 4, 4, TEXT), "BCTHW"),
    "frames_equal_channels": (lambda: FramesFirstDiT(), _frames_first_inputs, (4, 4, 4, TEXT), "BTCHW"),
    "mixing_before_attention": (lambda: MixingDiT(), _video_inputs, (F_, 4, 4, TEXT), "BCTHW"),
    "video_in_list": (lambda: ListInputDiT(), _list_inputs, (F_, 4, 4, TEXT), "BCTHW"),
    "unbatched_video_in_list": (lambda: ListInputDiT(), lambda s: _list_inputs(s, True), (F_, 4, 4, TEXT), "CTHW"),
}


def _optimize_and_run(model, first, unseen):
    """Compile on ``first``, run ``unseen``: (output, sites, templates' notes, rewritten site names)."""
    vc.optimize(model, plan=MASK, progress=False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**first)
            got = out_of(model(**unseen))
        st = state_of(model)
        return got, vc.sites_of(model), [n for t in st.templates for n in t.notes], set(st.rewritten)
    finally:
        vc.restore(model)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_form_is_rewritten_and_matches_the_masked_dense_oracle(name):
    make, inputs, (t, h, w, pre), axes = FORMS[name]
    torch.manual_seed(0)
    model = make().eval()
    first, unseen = inputs(10), inputs(20)
    with torch.no_grad():
        original = out_of(model(**unseen))
    got, sites, notes, rewritten = _optimize_and_run(model, first, unseen)
    assert len(sites) == 2 and all(s.tileable for s in sites), [s.describe() for s in sites]
    assert {(s.layout.num_frames, s.layout.height, s.layout.width, s.layout.text_prefix) for s in sites} == {(t, h, w, pre)}
    assert rewritten == {s.name for s in sites}  # the tile op runs, not dense attention
    assert any(n.startswith("token order confirmed by probe") for n in notes), notes
    if name == "mixing_before_attention":
        assert any("tokens mixed before the attention" in n for n in notes), notes
    if name == "cond_concat_graph_break":  # the second graph does not hold the video: the first one's probe counts
        assert any(n.startswith("token order confirmed by probe on an earlier graph") for n in notes), notes
    if name == "cond_concat_block_graphs":  # no attention graph holds the video: the model itself was run
        assert any("eager model run" in n for n in notes), notes
    with torch.no_grad():
        ref = reference_output("manual", model, unseen, sites, MASK)
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got, original) > 1e-4  # the mask changed something: the comparison can fail
    cands, _ = grid_candidates(model, (), first)
    assert axes in [g.axes for g in cands]


def test_cogvideox_with_channels_equal_to_frames_is_tiled():
    """diffusers' CogVideoX (per-frame Conv2d patchify, (B, F, C, H, W)) with 4 channels at 4 latent frames."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=24, num_layers=1, sample_width=WW,
                                        sample_height=HH, sample_frames=13, patch_size=2, max_text_seq_length=TEXT,
                                        temporal_compression_ratio=4).eval()

    def kw(seed):
        return {"hidden_states": _r(1, 4, 4, HH, WW, seed=seed), "encoder_hidden_states": _text(24, seed=seed + 1),
                    "timestep": torch.tensor([500])}

    assert infer_grid(model, (), kw(1))[0] is None  # the shape alone cannot tell: the probe decides
    with torch.no_grad():
        original = out_of(model(**kw(2)))
    got, sites, _notes, rewritten = _optimize_and_run(model, kw(1), kw(2))
    tiled = [s for s in sites if s.tileable]
    assert len(tiled) == 1 and rewritten == {s.name for s in tiled}, [s.describe() for s in sites]
    assert all((s.layout.num_frames, s.layout.frame_tokens, s.layout.text_prefix) == (4, 16, TEXT) for s in tiled)
    with torch.no_grad(), MaskedSDPA(sites, MASK):
        ref = out_of(model(**kw(2)))
    assert rel_err(got, ref) < 1e-5 and rel_err(got, original) > 1e-4


# ----------------------------------------------------------------------------- refusals and their messages


def _dense_sites(model, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = vc.inspect_model(model, kw)
    assert sites and not any(s.tileable for s in sites), [s.describe() for s in sites]
    return sites


def test_several_videos_packed_into_one_sequence_are_refused_with_the_reason():
    torch.manual_seed(0)
    kw = {"vision_tokens": [_r(1, C, F_, HH, WW, seed=1), _r(1, C, F_, HH, WW, seed=2)], "encoder_hidden_states": _text(24)}
    for s in _dense_sites(ListInputDiT().eval(), kw):
        assert "vision_tokens holds 2 videos" in s.reason and "48+48 video tokens packed into one sequence" in s.reason, s.reason


def test_packed_2d_patches_are_refused_with_the_reason():
    torch.manual_seed(0)
    kw = {"hidden_states": _r(48, 4 * C, seed=1), "grid_thw": torch.tensor([[3, 4, 4]]), "encoder_hidden_states": _text(24)}
    for s in _dense_sites(PackedPatchesDiT().eval(), kw):
        assert "packed token sequence" in s.reason and "grid_thw(1, 3)" in s.reason, s.reason


def test_mixing_does_not_hide_tokens_that_are_not_frame_major():
    torch.manual_seed(0)
    for s in _dense_sites(MixingDiT(order="HWT").eval(), _video_inputs(1)):
        assert "token-order probe" in s.reason and "not frame-major" in s.reason, s.reason
        assert "token mixing before the attention does not explain it" in s.reason, s.reason


def test_every_interpretation_tried_is_listed_when_none_is_confirmed():
    """Tokens in W, T, H order with 4 channels at 4 frames: both channel axes are probed and rejected."""
    torch.manual_seed(0)
    model = ManualDiT(in_channels=4, order="WTH").eval()
    kw = {"hidden_states": _r(1, 4, 4, HH, WW, seed=1), "encoder_hidden_states": _text(24)}
    for s in _dense_sites(model, kw):
        assert "no interpretation of the video input was confirmed" in s.reason, s.reason
        assert "as BCTHW" in s.reason and "as BTCHW" in s.reason and s.reason.count("not frame-major") == 2, s.reason


# ----------------------------------------------------------------------------- grid candidates


def test_candidates_name_conditioning_channels_and_nested_inputs():
    torch.manual_seed(0)
    model = CondConcatDiT().eval()  # config: 4 latent channels; input and patch embedding: 9
    grid, why = infer_grid(model, (), _cond_inputs(1))
    assert grid is None and "cannot tell the channel axis" in why and "as BCTHW" in why, why
    cands, _ = grid_candidates(model, (), _cond_inputs(1))
    assert cands[0].axes == "BCTHW" and "Conv3d in_channels" in cands[0].basis and not cands[0].certain
    model = CondConcatDiT(internal=True).eval()  # config: the 9 channels the model reads after its concatenation
    cands, _ = grid_candidates(model, (), _cond_internal_inputs(1))
    assert cands[0].axes == "BCTHW" and "(9 - 1) / 2" in cands[0].basis, [g.describe() for g in cands]
    bare = torch.nn.Module()
    bare.config = {"in_channels": 4, "cond_channels": 3}
    counts = channel_counts(bare)
    assert "2 x 4 + 1" in counts[9] and "config cond_channels" in counts[7] and counts[4] == "config in_channels"

    model = ListInputDiT().eval()
    grid, _ = infer_grid(model, (), _list_inputs(1))
    assert grid is not None and grid.key == "vision_tokens[0]" and grid.certain and grid.video_tokens == F_ * 16
    grid, _ = infer_grid(model, (), _list_inputs(1, unbatched=True))
    assert grid is not None and grid.axes == "CTHW" and grid.batch == 1
    nested = {"cond": {"video": _r(1, C, F_, HH, WW, seed=3)}, "encoder_hidden_states": _text(24)}
    cands, _ = grid_candidates(model, (), nested)
    assert cands and cands[0].key == "cond['video']" and cands[0].axes == "BCTHW"


def test_no_video_says_what_was_found():
    torch.manual_seed(0)
    grid, why = infer_grid(ListInputDiT().eval(), (), {"encoder_hidden_states": _text(24), "vision_tokens": []})
    assert grid is None and "no video tensor" in why and "encoder_hidden_states(1, 8, 24)" in why, why
