"""Temporary, undone-on-exit adjustments that make some diffusers models traceable by ``torch.export``.

CogVideoX-style patch embeddings (``CogVideoXPatchEmbed``) rebuild their sin-cos position table in
``forward`` when the input's frame count or size differs from the config's ``sample_*``, writing it
through ``.data`` (which ``torch.export`` cannot lift).  The table depends only on shapes, so for
the export we compute it once for the example input's shape and install it as the module's buffer
with matching ``sample_*``: the traced computation is identical, the frame count becomes fixed.
Everything is restored on exit; no class or global is patched.

A model rewritten by ``vdit_compile.optimize`` has a compiled ``forward`` on the instance; export
traces the class's own ``forward`` instead (the rewrite is re-applied on the exported graph).
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch


def _pos_embed_modules(model: torch.nn.Module):
    for mod in model.modules():
        if (hasattr(mod, "_get_positional_embeddings") and hasattr(mod, "sample_frames")
                and getattr(mod, "use_positional_embeddings", False)
                and not getattr(mod, "use_learned_positional_embeddings", True)):
            yield mod


@contextlib.contextmanager
def original_forward(model: torch.nn.Module):
    """Trace the class's own ``forward`` even when ``vdit_compile.optimize`` installed a compiled one
    on the instance (``torch.export`` cannot trace ``torch.compile``); the installed one is put back."""
    installed = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if installed is not None:
            model.__dict__["forward"] = installed


@contextlib.contextmanager
def export_adapters(model: torch.nn.Module, example_inputs: Mapping):
    """Both adjustments of this module (see module doc), undone on exit."""
    with original_forward(model), _pos_embed_tables(model, example_inputs):
        yield


@contextlib.contextmanager
def _pos_embed_tables(model: torch.nn.Module, example_inputs: Mapping):
    mods = list(_pos_embed_modules(model))
    if not mods:
        yield
        return
    seen: dict[torch.nn.Module, tuple] = {}
    def record(mod, args):
        seen.setdefault(mod, tuple(args[1].shape))  # (text_embeds, image_embeds): B, T, C, H, W

    hooks = [m.register_forward_pre_hook(record) for m in mods]
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for h in hooks:
            h.remove()
    saved = []
    try:
        for mod, shape in seen.items():
            _, frames, _, height, width = shape
            pre_frames = (frames - 1) * mod.temporal_compression_ratio + 1
            saved.append((mod, mod.sample_frames, mod.sample_height, mod.sample_width, mod.pos_embedding))
            table = mod._get_positional_embeddings(height, width, pre_frames, device=mod.pos_embedding.device)
            mod.sample_frames, mod.sample_height, mod.sample_width = pre_frames, height, width
            mod.pos_embedding = table.to(mod.pos_embedding.dtype)
        yield
    finally:
        for mod, f, h, w, table in saved:
            mod.sample_frames, mod.sample_height, mod.sample_width = f, h, w
            mod.pos_embedding = table
