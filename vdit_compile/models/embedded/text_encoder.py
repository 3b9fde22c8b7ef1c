"""Small transformer text encoder trained jointly with the DiT (no download needed).

Why a transformer rather than a bag of words: word order matters in two-object captions ("a red circle moving
left and a blue square moving up"), and the DiT's cross-attention wants one vector per token, like T5 gives Wan.
Padding positions are zeroed on output, as Wan's pipeline does with its T5 features, so the null prompt (empty
caption, used for classifier-free guidance) encodes to all zeros.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class EmbeddedTextEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, vocab_size: int = 64, max_length: int = 24, dim: int = 128, num_layers: int = 2,
                 num_heads: int = 4, ffn_dim: int = 512):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, dim) features, zero where attention_mask is False."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds max_length {self.config.max_length}")
        if attention_mask is None:
            attention_mask = input_ids != 0
        x = self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]
        # An all-padding row (the null prompt) must not make attention softmax over nothing: let such rows
        # attend everywhere; their output is zeroed below anyway.
        key_pad = ~attention_mask & attention_mask.any(dim=1, keepdim=True)
        bias = torch.zeros(key_pad.shape, dtype=x.dtype, device=x.device).masked_fill(key_pad, float("-inf"))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=bias)
        return self.norm(x) * attention_mask[..., None].to(x.dtype)

