"""Adapters for real pipelines: the embedded default, and pipelines from ``vdit_compile.models.spec``.

``EmbeddedAdapter`` wraps :class:`vdit_compile.models.embedded.EmbeddedPipeline` (pixel space, no VAE).
``PipelineAdapter`` covers other diffusers flow-matching pipelines that expose ``transformer``,
``scheduler`` and ``encode_prompt``, given the latent shape (``--extra`` is not needed for the embedded
model); a bare transformer is refused with a message saying why (distillation needs text embeddings
and the teacher's scheduler, which only a pipeline has).
"""
from __future__ import annotations

import torch

from .adapter import ModelAdapter
from .config import DistillConfigError


class EmbeddedAdapter(ModelAdapter):
    """The embedded default text-to-video model (``vdit_compile.models.embedded``)."""

    name = "embedded"

    def __init__(self, device="cpu", pipe=None, spec: str = "embedded"):
        if pipe is None:
            from vdit_compile.models.spec import load_model

            pipe = load_model(spec)
        pipe.to(device)
        self.pipe, self.name = pipe, spec
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self.default_guidance = float(getattr(pipe, "default_guidance_scale", 3.0))
        from vdit_compile.models.worlds import world_data, world_of_pipe

        data = world_data(world_of_pipe(pipe))  # the textured world's pipeline is an EmbeddedPipeline too
        self._data = data
        self._shape = (pipe.transformer.config.in_channels, data.NUM_FRAMES, data.HEIGHT, data.WIDTH)

    def to(self, device):
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts, device):
        return self.pipe.encode_prompt(list(prompts), device).float()

    def latent_shape(self):
        return self._shape

    def decode(self, latents):
        return (latents.float().permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0.0, 1.0)

    def sample_prompts(self, n, seed):
        """Captions of procedural clips (seeds ``seed*100003 + i``): the distribution the model was trained on."""
        d = self._data
        return [d.caption_of(d.sample_attributes(seed * 100003 + i)) for i in range(n)]


class PipelineAdapter(ModelAdapter):
    """A generic diffusers flow-matching pipeline with ``encode_prompt``; latents given by ``latent_shape``."""

    def __init__(self, pipe, spec: str, latent_shape: tuple[int, ...], device="cpu"):
        missing = [a for a in ("transformer", "scheduler", "encode_prompt") if not hasattr(pipe, a)]
        if missing:
            raise DistillConfigError(f"model {spec!r} ({type(pipe).__name__}) lacks {missing}; distillation needs a "
                                     f"flow-matching pipeline with a transformer, a scheduler and encode_prompt")
        if not hasattr(pipe.scheduler, "sigmas"):
            raise DistillConfigError(f"{type(pipe.scheduler).__name__} is not a flow-matching scheduler (no sigmas)")
        pipe.to(device)
        self.pipe, self.name, self._shape = pipe, spec, tuple(latent_shape)
        self.transformer, self.scheduler = pipe.transformer, pipe.scheduler
        self.default_guidance = float(getattr(pipe, "default_guidance_scale", 5.0))

    @torch.no_grad()
    def encode(self, prompts, device):
        out = self.pipe.encode_prompt(list(prompts), device=device)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    def latent_shape(self):
        return self._shape

    def decode(self, latents):
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return (latents.float()[:, :3].permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0, 1)
        video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (video.float().permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0, 1)


def adapter_from_spec(spec: str, device="cpu", latent_shape=None) -> ModelAdapter:
    """Adapter for any spec ``vdit_compile.models.spec.load_model`` accepts."""
    from vdit_compile.models.spec import load_model

    model = load_model(spec)
    from vdit_compile.models.embedded import EmbeddedPipeline

    if isinstance(model, EmbeddedPipeline):
        return EmbeddedAdapter(device=device, pipe=model, spec=spec)
    if isinstance(model, torch.nn.Module):
        raise DistillConfigError(
            f"model {spec!r} is a bare {type(model).__name__}: distillation needs a pipeline (text encoder for the "
            f"prompts, the teacher's scheduler); pass a pipeline spec (a diffusers pipeline directory or a "
            f"'module:factory' returning one)"
        )
    if latent_shape is None:
        raise DistillConfigError(f"model {spec!r} is a {type(model).__name__}: give its latent shape in the config's "
                                 f"extra field, e.g. --config with {{\"extra\": {{\"latent_shape\": [16, 13, 60, 104]}}}}")
    return PipelineAdapter(model, spec, latent_shape, device=device)
