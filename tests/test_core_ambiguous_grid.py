"""Video inputs whose frame count equals the channel count: (B, C, T, H, W) with C == T.

The channel axis cannot be read from the shape. For a Conv3d patch embedding the grid assumes
axis 1 and the token-order probe must confirm it (the 2026-11-25 H100 step benchmark ran Wan with
8 latent channels at 8 latent frames and tiled nothing); a model that permutes before its Conv3d
must be caught by the probe, never tiled with the wrong frames (the other axis is then tried).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from core_models import MaskedSDPA, out_of, rel_err

import vdit_compile as vc
from vdit_compile import TileMask
from vdit_compile.capture import state_of

C = T = 4


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=C,
                              out_channels=C, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2,
                              rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, C, T, 6, 8, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 5, 24, generator=g), return_dict=False)
    return m, kw


def test_wan_with_frames_equal_to_channels_is_tiled_and_matches_the_oracle():
    model, kw = _wan()
    with torch.no_grad():
        original = out_of(model(**kw))
    mask = TileMask(1, 0)
    vc.optimize(model, plan=mask, progress=False)
    try:
        with torch.no_grad():
            sparse = out_of(model(**kw))
        sites = vc.sites_of(model)
        tiled = [s for s in sites if s.tileable]
        assert len(tiled) == 2, [(s.name, s.kind, s.reason) for s in sites]
        assert all(s.layout.num_frames == T and s.layout.frame_tokens == 12 for s in tiled)
    finally:
        vc.restore(model)
    with torch.no_grad(), MaskedSDPA(sites, mask):
        ref = out_of(model(**kw))
    assert rel_err(sparse, ref) < 1e-5
    assert rel_err(sparse, original) > 1e-4  # the mask changed something: the check can fail


class PermutingDiT(torch.nn.Module):
    """Takes (B, T, C, H, W) but permutes to (B, C, T, H, W) before its Conv3d: axis 1 is NOT the channels."""

    def __init__(self, c=C, dim=32, heads=2):
        super().__init__()
        self.in_channels, self.heads = c, heads
        self.embed = torch.nn.Conv3d(c, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states):
        x = self.embed(hidden_states.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)  # (B, T*H*W, dim)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_a_model_that_permutes_before_its_conv3d_is_tiled_on_its_real_frame_axis():
    """Axis 1 (the Conv3d guess) is rejected by the probe; since issue 22 the other axis is tried and confirmed
    (BTCHW), so the sites are tiled with the real frames, never the guessed ones (tests/test_grid_forms.py covers
    more such forms)."""
    torch.manual_seed(0)
    model = PermutingDiT().eval()
    x = torch.randn(1, T, C, 6, 8)
    with torch.no_grad():
        original = model(x)
    mask = TileMask(0, 0)
    vc.optimize(model, plan=mask, progress=False)
    try:
        with torch.no_grad():
            got = model(hidden_states=x)
        sites = vc.sites_of(model)
        notes = [n for t in state_of(model).templates for n in t.notes]
    finally:
        vc.restore(model)
    assert sites and all(s.tileable for s in sites), [(s.name, s.kind, s.reason) for s in sites]
    assert any("as BTCHW" in n for n in notes), notes
    with torch.no_grad(), MaskedSDPA(sites, mask):
        ref = model(hidden_states=x)
    assert rel_err(got, ref) < 1e-5 and rel_err(got, original) > 1e-4
