"""EmbeddedPipeline: text -> video with the embedded Wan DiT, flow matching, classifier-free guidance.

Why a diffusers DiffusionPipeline: the core's optimize() and the calibration input capture take any diffusers
pipeline with a ``transformer``; the embedded model is the reference case, so it must look like one
(components registered, ``.to()``, progress bars, a FlowMatchEulerDiscreteScheduler as Wan uses).

Sampling works in pixel space: x in [-1, 1], sigma goes 1 -> 0, x_sigma = (1 - sigma) x0 + sigma noise, and
the transformer predicts the velocity noise - x0 (so the Euler step of the scheduler applies as is).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import data
from .text_encoder import EmbeddedTextEncoder
from .tokenizer import CaptionTokenizer

DEFAULT_GUIDANCE_SCALE = 3.0


@dataclass
class EmbeddedPipelineOutput(BaseOutput):
    """frames: float32 (B, T, 3, H, W) in [0, 1]."""

    frames: torch.Tensor


class EmbeddedPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: EmbeddedTextEncoder,
                 tokenizer: CaptionTokenizer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.default_guidance_scale = DEFAULT_GUIDANCE_SCALE

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device=None, unknown: str | None = None) -> torch.Tensor:
        """Prompts -> text features (B, max_length, text_dim); "" is the null prompt (all zeros)."""
        device = device or self._execution_device
        ids, mask = self.tokenizer(prompt, device=device, unknown=unknown)
        return self.text_encoder(ids, mask)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_frames: int = data.NUM_FRAMES,
                 height: int = data.HEIGHT, width: int = data.WIDTH, negative_prompt: str | list[str] | None = None,
                 latents: torch.Tensor | None = None, unknown: str | None = None, return_dict: bool = True,
                 progress: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        p_t, p_h, p_w = self.transformer.config.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"(num_frames, height, width) = {(num_frames, height, width)} must be multiples of "
                             f"the patch size {(p_t, p_h, p_w)}")
        guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        device = self._execution_device
        B = len(prompts)
        cond = self.encode_prompt(prompts, device, unknown)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            neg = [""] * B if negative_prompt is None else (
                [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(neg) != B:
                raise ValueError(f"negative_prompt has {len(neg)} entries, prompt has {B}")
            cond = torch.cat([cond, self.encode_prompt(neg, device, unknown)])
        dtype = self.transformer.dtype
        cond = cond.to(dtype)

        shape = (B, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.set_progress_bar_config(disable=not progress)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                x_in = torch.cat([latents, latents]) if do_cfg else latents
                t_in = t.expand(x_in.shape[0]).to(device)
                v = self.transformer(hidden_states=x_in.to(dtype), timestep=t_in, encoder_hidden_states=cond,
                                     return_dict=False)[0].float()
                if do_cfg:
                    v_c, v_u = v.chunk(2)
                    v = v_u + guidance_scale * (v_c - v_u)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
                bar.update()
        frames = (latents.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0.0, 1.0)  # (B, T, 3, H, W)
        self.maybe_free_model_hooks()
        return EmbeddedPipelineOutput(frames=frames) if return_dict else (frames,)


def _grid(frames: torch.Tensor, columns: int | None, scale: int, pad: int = 1):
    """(B, T, 3, H, W) or (T, 3, H, W) -> uint8 (T, H', W', 3) tiled grid, upscaled by `scale` (nearest)."""
    import math

    if frames.dim() == 4:
        frames = frames[None]
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be (B, T, 3, H, W) or (T, 3, H, W), got {tuple(frames.shape)}")
    B, T, _, H, W = frames.shape
    cols = columns or min(B, 4)
    rows = math.ceil(B / cols)
    f = frames.detach().float().cpu().clamp(0, 1)
    f = f.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    h, w = H * scale + pad, W * scale + pad
    canvas = torch.ones(T, 3, rows * h + pad, cols * w + pad)
    for i in range(B):
        r, c = divmod(i, cols)
        canvas[:, :, pad + r * h: pad + r * h + H * scale, pad + c * w: pad + c * w + W * scale] = f[i]
    return (canvas.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def save_gif(frames: torch.Tensor, path, fps: int = 8, columns: int | None = None, scale: int = 4) -> str:
    """Write clips as one looping GIF (a grid when several clips)."""
    import imageio.v2 as imageio

    imageio.mimsave(str(path), list(_grid(frames, columns, scale)), duration=1.0 / fps, loop=0)
    return str(path)


def save_mp4(frames: torch.Tensor, path, fps: int = 8, columns: int | None = None, scale: int = 4) -> str:
    """Write clips as an MP4 (needs ffmpeg through imageio-ffmpeg; says so clearly when missing)."""
    import imageio.v2 as imageio

    try:
        writer = imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1)
    except (ImportError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"saving MP4 needs ffmpeg (pip install imageio-ffmpeg); use save_gif instead ({e})") from e
    with writer:
        for frame in _grid(frames, columns, scale):
            writer.append_data(frame)
    return str(path)
