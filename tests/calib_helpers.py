"""Model factories for the calibration/CLI tests, used through 'tests/calib_helpers.py:<factory>' specs."""
from __future__ import annotations

import torch

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                  text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6)


def wan_inputs(frames: int = 5, size: int = 8, text: int = 8, batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, frames, size, size, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "return_dict": False,
    }


def tiny_wan_module():
    """A 2-layer, 2 x 16-head diffusers Wan transformer (fp32, eval, seeded) without example inputs."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_CONFIG).eval()


def tiny_wan():
    """(model, example forward kwargs): 5 latent frames of 8x8 (5x4x4 tokens after 2x2 patches), 8 text tokens."""
    return tiny_wan_module(), wan_inputs()


def tiny_pipeline():
    """The embedded pipeline, randomly initialised in its tiny (2-layer) variant."""
    from vdit_compile.models.embedded import load_pipeline

    return load_pipeline(weights=None, tiny=True)


def not_a_model():
    return 42


class FrameLocalDiT(torch.nn.Module):
    """A video DiT whose attention stays inside each frame by construction.

    Tokens carry a strong per-frame embedding, orthogonal between frames within every head, and
    q = k = the tokens: a query's scores to other frames are ~``strength**2 * scale`` lower, so
    dropping every other frame (mask ``g0w0``) changes the output by ~exp(-16). Calibration at
    the default budget must find that; attention over random data would not.
    """

    def __init__(self, channels: int = 4, heads: int = 2, head_dim: int = 16, max_frames: int = 8,
                 strength: float = 8.0):
        super().__init__()
        dim = heads * head_dim
        self.heads = heads
        self.patch_embed = torch.nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        fe = torch.zeros(max_frames, heads, head_dim)
        fe[torch.arange(max_frames), :, torch.arange(max_frames)] = strength
        self.register_buffer("frame_embed", fe.reshape(max_frames, dim))
        self.v_proj = torch.nn.Linear(dim, dim)
        self.proj_out = torch.nn.Linear(dim, channels * 4)

    def forward(self, hidden_states):
        b, c, t, h, w = hidden_states.shape
        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        x = 0.05 * x + self.frame_embed[:t].repeat_interleave((h // 2) * (w // 2), 0)
        qk = x.view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)
        v = self.v_proj(x).view_as(qk.transpose(1, 2)).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(qk, qk, v, scale=0.25)
        return self.proj_out(o.transpose(1, 2).reshape(b, -1, x.shape[-1]))


def frame_local_dit():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    return FrameLocalDiT().eval(), {"hidden_states": torch.randn(1, 4, 5, 8, 8, generator=g)}
