"""LoRA on an optimised pipeline.

Why nothing has to be patched: ``optimize`` compiles the transformer *instance's* forward with
``dynamic=False``; diffusers' PEFT integration (``load_lora_weights``, ``set_adapters``,
``fuse_lora``/``unfuse_lora``, ``unload_lora_weights``) changes the module tree or the adapters'
Python-side scales.  Dynamo's guards on the inlined modules see the change and recompile the
forward once; every recompile goes through the vdit backend again, whose passes find and rewrite
the same attention sites with the plan already held by the model (no re-calibration: site names
are module paths of the attention modules, which LoRA leaves alone - it wraps their ``to_q`` /
``to_k`` / ... children).  Going back to an earlier configuration (unfuse, unload) hits a graph
already in Dynamo's cache.  ``restore`` only puts the forward back, so it works with or without
adapters.  Measured on the embedded model (tests/test_wholestep_lora.py): one new graph per load /
set_adapters / fuse, none for unfuse / unload.

Limits: with ``fp8="on"`` the linears' weights are torchao float8 tensors; fusing a LoRA into them
is not supported by PEFT - fuse the LoRA first, then ``optimize(..., fp8=...)`` (the fused weights are
quantised).  ``fp8="emulate"`` keeps the linears' types and names, so LoRA loads on top of it.
With ``fuse_qkv=True`` the fused ``to_qkv`` replaces ``to_q``/``to_k``/``to_v``: adapters loaded after ``optimize``
would wrap the replaced ones, so the forward raises (``wholestep.fusion.FusedGuard``); adapters present before it
keep the projections unfused (a warning).

The embedded pipeline has no LoRA loader of its own; :func:`lora_pipeline` gives the same components
in a pipeline with diffusers' ``WanLoraLoaderMixin`` (the embedded DiT is a ``WanTransformer3DModel``).
"""
from __future__ import annotations

import torch
from diffusers.loaders.lora_pipeline import (
    WanLoraLoaderMixin,  # importable without peft (loading needs it)
)

from ..models.embedded.pipeline import EmbeddedPipeline


class LoraEmbeddedPipeline(EmbeddedPipeline, WanLoraLoaderMixin):
    """The embedded pipeline with ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unload_lora_weights``."""


def lora_pipeline(pipe: EmbeddedPipeline) -> LoraEmbeddedPipeline:
    """The same components (shared, not copied) in a LoRA-capable pipeline."""
    if isinstance(pipe, LoraEmbeddedPipeline):
        return pipe
    out = LoraEmbeddedPipeline(pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    out.default_guidance_scale = pipe.default_guidance_scale
    return out


def random_lora(transformer: torch.nn.Module, rank: int = 4, targets=(".attn1.", ".ffn."), seed: int = 0,
                std: float = 0.1, prefix: str = "transformer.") -> dict:
    """A random LoRA state dict (PEFT names) for the linears of ``transformer`` whose name contains a target.

    ``lora_B`` is random too (not zero as in training), so the adapter changes the output.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in transformer.named_modules():
        if type(m) is not torch.nn.Linear or ".lora_" in name:  # an adapter's own linears
            continue
        name = name.removesuffix(".base_layer")  # a linear that carries adapters already: its PEFT name
        if name.startswith("blocks.") and any(t in name for t in targets):
            sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * std
            sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * std
    if not sd:
        raise ValueError(f"random_lora: no nn.Linear under blocks.* matches {targets}")
    return sd


def graphs_compiled(model_or_pipe) -> int:
    """How many FX graphs the vdit backend has compiled for this model (recompiles show up here)."""
    from ..capture.install import state_of

    module = model_or_pipe if isinstance(model_or_pipe, torch.nn.Module) else model_or_pipe.transformer
    state = state_of(module)
    return state.graphs if state is not None else 0
