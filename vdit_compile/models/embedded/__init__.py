"""The embedded default model: procedural text-to-video data, a small Wan DiT and its pipeline.

``load_pipeline()`` returns the shipped, trained pipeline (weights in ``weights/``, trained by
tools/train_reference.py); ``load_pipeline(weights=None)`` a randomly initialised one (for tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import data
from .checkpoint import load_embedded, read_config, save_embedded
from .pipeline import DEFAULT_GUIDANCE_SCALE, EmbeddedPipeline, EmbeddedPipelineOutput, save_gif, save_mp4
from .tokenizer import CaptionTokenizer
from .transformer import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TRANSFORMER_CONFIG,
    build_seeded,
    build_text_encoder,
    build_transformer,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_available() -> bool:
    return (WEIGHTS_DIR / "config.json").is_file() and (WEIGHTS_DIR / "model.safetensors").is_file()


def load_pipeline(device="cpu", weights="default", dtype: torch.dtype = torch.float32, tiny: bool = False,
                  seed: int = 0) -> EmbeddedPipeline:
    """The embedded pipeline.

    weights: "default" (the shipped weights in the package), a directory written by save_embedded (e.g. a
    tools/train_reference.py run's ``weights/``), or None for random init (seeded by ``seed``; ``tiny=True``
    gives a 2-layer, width-64 variant for fast tests).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if weights is None:
        tokenizer = CaptionTokenizer()
        transformer, text_encoder = build_seeded(tokenizer, TINY_TRANSFORMER_CONFIG if tiny else TRANSFORMER_CONFIG,
                                                 TINY_TEXT_ENCODER_CONFIG if tiny else TEXT_ENCODER_CONFIG, seed)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        transformer.to(device).eval()
        if dtype != torch.float32:
            transformer.to(dtype)
        text_encoder.to(device).eval()
        return EmbeddedPipeline(transformer, text_encoder, tokenizer, scheduler)
    if tiny:
        raise ValueError("tiny=True only applies to random init (weights=None)")
    path = WEIGHTS_DIR if weights == "default" else Path(weights)
    if weights == "default" and not weights_available():
        raise FileNotFoundError(f"the embedded model's weights are not shipped yet (expected {WEIGHTS_DIR}/"
                                "model.safetensors and config.json); train them with tools/train_reference.py --ship "
                                "or pass weights=None for a random init")
    transformer, text_encoder, tokenizer, scheduler, cfg = load_embedded(path, device, dtype)
    pipe = EmbeddedPipeline(transformer, text_encoder, tokenizer, scheduler)
    pipe.default_guidance_scale = cfg.get("default_guidance_scale", DEFAULT_GUIDANCE_SCALE)
    return pipe


__all__ = ["data", "load_pipeline", "weights_available", "WEIGHTS_DIR", "EmbeddedPipeline", "EmbeddedPipelineOutput",
           "CaptionTokenizer", "save_gif", "save_mp4", "save_embedded", "load_embedded", "read_config",
           "build_transformer", "build_text_encoder", "TRANSFORMER_CONFIG", "TEXT_ENCODER_CONFIG",
           "DEFAULT_GUIDANCE_SCALE"]
