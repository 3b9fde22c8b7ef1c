"""The textured world: a second reference text-to-video model whose attention the data makes *local*.

Same machinery as the embedded model (``vdit_compile.models.embedded``: word tokenizer, small text encoder,
diffusers ``WanTransformer3DModel`` in pixel space, flow-matching pipeline, one-file checkpoint), other data
(``data.py``: textured objects and drifting noise backgrounds, 16 x 64 x 64 clips) and other sizes
(``TRANSFORMER_CONFIG``: 16 frames x 16 x 16 = 4,096 video tokens).

``load_pipeline()`` returns the shipped, trained pipeline (weights in ``weights/``, trained by
``tools/train_reference.py --world textured``); ``load_pipeline(weights=None)`` a random one (tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..embedded.checkpoint import load_embedded, save_embedded
from ..embedded.pipeline import DEFAULT_GUIDANCE_SCALE, EmbeddedPipeline, save_gif
from ..embedded.tokenizer import CaptionTokenizer
from ..embedded.transformer import SCHEDULER_CONFIG as _BASE_SCHEDULER
from ..embedded.transformer import TRANSFORMER_CONFIG as _BASE_TRANSFORMER
from ..embedded.transformer import build_seeded
from . import data

WEIGHTS_DIR = Path(__file__).parent / "weights"
NAME = "textured"

# Wan-class DiT: 4 layers, width 128 = 4 heads x 32 (head dim 32 keeps Wan's 3D RoPE 6/5/5 frequencies per axis),
# FFN 512, patch (1, 4, 4) over 64 x 64 pixels -> 16 x 16 tokens per frame: 1.23 M parameters.  Sized by the CPU
# demo: `vdit-compile demo --world textured` (2 prompts x 10 steps with CFG, calibration, three sampled rows) took
# 130 s on the idle 2-core CPU with this config (random weights, 2026-12-07 09:19-09:21 UTC) against 92 s for the first
# trained one (3 layers, width 96, 0.55 M: runs 1-2 of docs/textured/MODEL_CARD.md, which did not learn the
# captions' shape and motion in 10 GPU minutes), inside the issue's 3 minutes.  Weights trained with the old config
# still load: a checkpoint carries its own config.json.
TRANSFORMER_CONFIG = {**_BASE_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512,
                      "num_layers": 4, "text_dim": 64, "freq_dim": 128}
TEXT_ENCODER_CONFIG = {"dim": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 256}
TINY_TRANSFORMER_CONFIG = {**TRANSFORMER_CONFIG, "num_attention_heads": 1, "ffn_dim": 64, "num_layers": 1,
                           "text_dim": 32, "freq_dim": 32}
TINY_TEXT_ENCODER_CONFIG = {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64}
# Shift 3 from the start: where an object is (and which way it moves) is decided at high noise (the embedded
# model needed a second, shifted stage for that; docs/embedded/MODEL_CARD.md).
SCHEDULER_CONFIG = {**_BASE_SCHEDULER, "shift": 3.0}
VIDEO = {"num_frames": data.NUM_FRAMES, "height": data.HEIGHT, "width": data.WIDTH}


class TexturedPipeline(EmbeddedPipeline):
    """The embedded pipeline with the textured world's clip size as the default."""

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 50, guidance_scale: float | None = None, generator=None,
                 num_frames: int = data.NUM_FRAMES, height: int = data.HEIGHT, width: int = data.WIDTH,
                 negative_prompt=None, latents=None, unknown: str | None = None, return_dict: bool = True,
                 progress: bool = True):
        return super().__call__(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                generator=generator, num_frames=num_frames, height=height, width=width,
                                negative_prompt=negative_prompt, latents=latents, unknown=unknown,
                                return_dict=return_dict, progress=progress)


def make_tokenizer(unknown: str = "error") -> CaptionTokenizer:
    return CaptionTokenizer(data.VOCAB, max_length=data.MAX_CAPTION_WORDS, unknown=unknown)


def weights_available(weights_dir: Path | None = None) -> bool:
    d = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def save_textured(out_dir, transformer, text_encoder, tokenizer, extra: dict | None = None, **kw) -> Path:
    """save_embedded with this world's clip size and name recorded (load_pipeline checks the name)."""
    return save_embedded(out_dir, transformer, text_encoder, tokenizer, extra={"world": NAME, "video": VIDEO,
                                                                               **(extra or {})}, **kw)


def load_pipeline(device="cpu", weights="default", dtype: torch.dtype = torch.float32, tiny: bool = False,
                  seed: int = 0) -> TexturedPipeline:
    """The textured pipeline: weights "default" (shipped), a directory written by save_textured, or None (random,
    seeded; ``tiny=True``: 1 layer, 1 head, for fast tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if weights is None:
        tokenizer = make_tokenizer()
        transformer, text_encoder = build_seeded(tokenizer, TINY_TRANSFORMER_CONFIG if tiny else TRANSFORMER_CONFIG,
                                                 TINY_TEXT_ENCODER_CONFIG if tiny else TEXT_ENCODER_CONFIG, seed)
        pipe = TexturedPipeline(transformer.to(device).eval(), text_encoder.to(device).eval(), tokenizer,
                                FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
        if dtype != torch.float32:
            transformer.to(dtype)
        return pipe
    if tiny:
        raise ValueError("tiny=True only applies to random init (weights=None)")
    path = WEIGHTS_DIR if weights == "default" else Path(weights)
    if not weights_available(path):
        if weights == "default":
            raise FileNotFoundError(
                f"the textured world's weights are not shipped yet (expected {WEIGHTS_DIR}/model.safetensors and "
                "config.json); train them with `python tools/train_reference.py --world textured --ship` on a GPU "
                "(docs/textured/MODEL_CARD.md), or use load_pipeline(weights=None) for a random model")
        raise FileNotFoundError(f"{path} has no model.safetensors + config.json written by save_textured")
    transformer, text_encoder, tokenizer, scheduler, cfg = load_embedded(path, device, dtype)
    if cfg.get("world") != NAME:
        raise ValueError(f"{path} holds weights of world {cfg.get('world', 'embedded')!r}, not {NAME!r}")
    pipe = TexturedPipeline(transformer, text_encoder, tokenizer, scheduler)
    pipe.default_guidance_scale = cfg.get("default_guidance_scale", DEFAULT_GUIDANCE_SCALE)
    return pipe


__all__ = [
    "NAME",
    "SCHEDULER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_TRANSFORMER_CONFIG",
    "TRANSFORMER_CONFIG",
    "VIDEO",
    "WEIGHTS_DIR",
    "TexturedPipeline",
    "data",
    "load_pipeline",
    "make_tokenizer",
    "save_gif",
    "save_textured",
    "weights_available",
]
