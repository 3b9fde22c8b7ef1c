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
