"""What distillation needs from a model, behind one small interface.

Distillation never calls a pipeline's ``__call__``: it needs the pieces (text embeddings with and
without the prompt, the latent shape, the teacher's flow-matching schedule, the transformer's
velocity, a decoder to frames).  :class:`ModelAdapter` names them; :func:`load_adapter` builds one
for the embedded default, for a tiny random Wan model (tests), or for a pipeline given by a
``vdit_compile.models.spec`` spec that exposes the usual diffusers pieces.
"""
from __future__ import annotations

import copy
import zlib
from typing import Sequence

import torch
from torch import nn


class ModelAdapter:
    """Pieces of a flow-matching text-to-video pipeline that distillation uses.

    Subclasses set ``transformer``, ``scheduler`` (a flow-matching scheduler with ``set_timesteps``
    and ``sigmas``), ``default_guidance`` and ``name``, and implement the methods below.
    ``pipe`` is the original pipeline (the dense teacher for the scorecard) or ``None``.
    """

    name: str = "model"
    transformer: nn.Module
    scheduler = None
    default_guidance: float = 1.0
    pipe = None

    def encode(self, prompts: Sequence[str], device) -> torch.Tensor:
        raise NotImplementedError

    def negative(self, batch: int, device) -> torch.Tensor:
        """Unconditional embeddings (the CFG "empty prompt")."""
        return self.encode([""] * batch, device)

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent, without the batch dimension."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, *latent_shape)`` -> frames ``(B, T, 3, H, W)`` float in ``[0, 1]``."""
        raise NotImplementedError

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        raise NotImplementedError(f"{self.name} has no prompt generator: pass --prompts FILE")

    def velocity(self, transformer: nn.Module, x: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The transformer's flow-matching prediction (velocity ``noise - x0``) at ``timestep``."""
        out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def teacher_schedule(self, num_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps (N,), sigmas (N+1,))`` of the teacher's own scheduler at ``num_steps`` steps."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_steps, device="cpu")
        t = sched.timesteps.detach().to(torch.float32)
        s = sched.sigmas.detach().to(torch.float32)
        if s.numel() != num_steps + 1 or t.numel() != num_steps:
            raise ValueError(
                f"{type(sched).__name__}.set_timesteps({num_steps}) gave {t.numel()} timesteps and {s.numel()} sigmas; "
                f"distillation needs a flow-matching scheduler with N timesteps and N+1 sigmas"
            )
        return t.to(device), s.to(device)

    def structure(self) -> str:
        """A short description used in errors and in config.json."""
        return f"{type(self.transformer).__name__} latent {tuple(self.latent_shape())}"


# ------------------------------------------------------------------------------------------------
class HashTextEncoder(nn.Module):
    """Deterministic toy text encoder for the tiny test model: word hashes -> embeddings (no vocabulary)."""

    def __init__(self, dim: int = 16, buckets: int = 251, max_tokens: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(buckets, dim, generator=g), requires_grad=False)
        self.buckets, self.max_tokens = buckets, max_tokens

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_tokens, 1)
        for i, p in enumerate(prompts):
            words = p.lower().split()[: self.max_tokens]
            for j, w in enumerate(words):
                ids[i, j] = 1 + zlib.crc32(w.encode()) % (self.buckets - 1)
                mask[i, j] = 1.0
        return self.table[ids] * mask


class TinyAdapter(ModelAdapter):
    """A tiny randomly initialised diffusers ``WanTransformer3DModel`` (tests, CPU development)."""

    name = "tiny"
    WORDS = ("red", "green", "blue", "circle", "square", "left", "right", "up", "down", "small", "large")

    def __init__(self, seed: int = 0, frames: int = 4, size: int = 8, channels: int = 3):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        torch.manual_seed(seed)
        self.transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels,
            out_channels=channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        ).eval()
        self.text = HashTextEncoder(dim=16, seed=seed)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.default_guidance = 3.0
        self._shape = (channels, frames, size, size)

    def to(self, device):
        self.transformer.to(device)
        return self

    def encode(self, prompts, device):
        return self.text(list(prompts)).to(device)

    def negative(self, batch, device):
        return torch.zeros(batch, self.text.max_tokens, self.text.table.shape[1], device=device)

    def latent_shape(self):
        return self._shape

    def decode(self, latents):
        return torch.sigmoid(latents[:, :3].float()).permute(0, 2, 1, 3, 4).contiguous()

    def sample_prompts(self, n, seed):
        import random

        rng = random.Random(seed)
        return [" ".join(rng.choice(self.WORDS) for _ in range(3)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
