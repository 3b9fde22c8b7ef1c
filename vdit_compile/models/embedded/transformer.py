"""Configuration and construction of the embedded DiT (a small diffusers WanTransformer3DModel).

Why Wan: it is a real diffusers video DiT (3D RoPE, full 3D self-attention over frames x patches, text
cross-attention, AdaLN modulation), so the core's capture and detection run on the same code as a large
Wan model; only the sizes differ. Pixel space (3 channels, no VAE) with patch (1, 4, 4): a 16 x 32 x 32 clip
becomes 16 frames x 8 x 8 = 64 tokens per frame, 1024 tokens in all.
"""
from __future__ import annotations

import copy

import torch
from diffusers import WanTransformer3DModel

from .text_encoder import EmbeddedTextEncoder
from .tokenizer import CaptionTokenizer

# The shipped model's DiT: 5 layers of width 192 (6 heads x 32), about 3 M parameters. Small on purpose: the
# main job (demo) samples it on a 2-core CPU (~40 GFLOP/s), and 6 heads per layer give per-head masks room
# to differ.
TRANSFORMER_CONFIG = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 128,
    "freq_dim": 256,
    "ffn_dim": 768,
    "num_layers": 5,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TEXT_ENCODER_CONFIG = {"dim": 128, "num_layers": 2, "num_heads": 4, "ffn_dim": 512}

# A tiny variant for fast CPU tests (same structure, random weights only).
TINY_TRANSFORMER_CONFIG = {**TRANSFORMER_CONFIG, "num_attention_heads": 2, "attention_head_dim": 32,
                           "ffn_dim": 128, "num_layers": 2, "text_dim": 32, "freq_dim": 64}
TINY_TEXT_ENCODER_CONFIG = {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64}

# The scheduler defaults for a *new* model (tools/train_reference.py's --shift default): flow matching, unshifted.
# The shipped weights carry their own scheduler config (shift 3: stage 2 of their training was shifted, because a
# 16 x 32 x 32 x 3 clip keeps its coarse layout visible up to high noise, so where an object goes is decided at
# sigma > 0.9, which unshifted training rarely visits; docs/embedded/MODEL_CARD.md), and load_pipeline uses that.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}


def build_transformer(config: dict | None = None) -> WanTransformer3DModel:
    cfg = copy.deepcopy(TRANSFORMER_CONFIG if config is None else config)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    return WanTransformer3DModel(**cfg)


def build_text_encoder(tokenizer: CaptionTokenizer, config: dict | None = None) -> EmbeddedTextEncoder:
    cfg = dict(TEXT_ENCODER_CONFIG if config is None else config)
    return EmbeddedTextEncoder(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length, **cfg)


def build_seeded(tokenizer: CaptionTokenizer, transformer_config: dict, text_encoder_config: dict,
                 seed: int) -> tuple[WanTransformer3DModel, EmbeddedTextEncoder]:
    """A random transformer and text encoder drawn from ``seed`` (every world's ``load_pipeline(weights=None)``),
    leaving torch's global RNG as it was: building a model must not shift the random numbers of what follows."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_transformer(transformer_config), build_text_encoder(tokenizer, text_encoder_config)
    finally:
        torch.random.set_rng_state(state)


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
