"""Save and load the embedded model: one safetensors file plus a config JSON.

Why one file: the shipped weights live in the package (<= 25 MB, fp16 storage) and a training run's output
directory has the same format, so ``load_pipeline(weights=<dir>)`` takes either.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from . import data
from .tokenizer import CaptionTokenizer
from .transformer import SCHEDULER_CONFIG, build_text_encoder, build_transformer

FORMAT = "vdit-embedded-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_embedded(out_dir, transformer, text_encoder, tokenizer: CaptionTokenizer, extra: dict | None = None,
                  dtype: torch.dtype = torch.float16, guidance_scale: float | None = None,
                  scheduler: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE))
    tcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.config.items()
            if not k.startswith("_")}
    ecfg = {k: v for k, v in text_encoder.config.items() if not k.startswith("_") and k not in ("vocab_size",
                                                                                                   "max_length")}
    cfg = {"format": FORMAT, "transformer": tcfg, "text_encoder": ecfg, "tokenizer": tokenizer.to_dict(),
           "scheduler": dict(SCHEDULER_CONFIG if scheduler is None else scheduler),
           "video": {"num_frames": data.NUM_FRAMES, "height": data.HEIGHT, "width": data.WIDTH},
           "storage_dtype": str(dtype).replace("torch.", "")}
    if guidance_scale is not None:
        cfg["default_guidance_scale"] = guidance_scale
    cfg.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def read_config(weights_dir) -> dict:
    path = Path(weights_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {weights_dir}: expected a directory written by save_embedded "
                                "(tools/train_reference.py output or the package's weights/)")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path} has format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_embedded(weights_dir, device="cpu", dtype: torch.dtype = torch.float32):
    """-> (transformer, text_encoder, tokenizer, scheduler, config dict)."""
    cfg = read_config(weights_dir)
    tokenizer = CaptionTokenizer.from_dict(cfg["tokenizer"])
    transformer = build_transformer(cfg["transformer"])
    text_encoder = build_text_encoder(tokenizer, cfg["text_encoder"])
    state = load_file(str(Path(weights_dir) / WEIGHTS_FILE))
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_dir}: {prefix[:-1]} weights do not match its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    transformer.to(device).eval()
    if dtype != torch.float32:
        transformer.to(dtype)
    text_encoder.to(device).eval()
    return transformer, text_encoder, tokenizer, scheduler, cfg
