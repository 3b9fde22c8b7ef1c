"""Small hand-written video DiTs whose inputs hide the token grid (issue 22), for tests/test_grid_forms.py.

Each reuses :class:`core_models.ManualDiT`'s blocks (hand-written softmax attention with an
``attn_override`` hook, so :func:`core_models.reference_output` gives the masked-dense oracle) and
only changes how the video reaches the tokens:

* :class:`CondConcatDiT`: a conditioning video and a mask channel concatenated to the latents
  (``2C+1`` input channels) while the config names the ``C`` latent channels; with
  ``internal=True`` the model concatenates them itself and the config names the ``2C+1``
  (:class:`CondConcatBreakDiT`, :class:`CondConcatBlockBreakDiT`: the same with graph breaks);
* :class:`FramesFirstDiT`: ``(B, F, C, H, W)`` latents patchified per frame by a Conv2d
  (CogVideoX style), built with ``C == F``;
* :class:`MixingDiT`: a linear-attention + temporal-convolution block before the softmax blocks;
* :class:`ListInputDiT`: the video inside a list (``vision_tokens=[video]``), batched, unbatched,
  or several videos packed into one sequence.
"""
from __future__ import annotations

import torch
from core_models import DIM, ManualDiT
from torch import nn

C, F_, HH, WW = 4, 3, 8, 8  # latent channels, latent frames, height, width (F_ != C unless a test wants it)


class CondConcatDiT(ManualDiT):
    """Latents + conditioning video + mask along the channels: the patch embedding reads ``2C+1`` channels."""

    def __init__(self, c=C, internal=False, **kw):
        super().__init__(in_channels=2 * c + 1, **kw)
        self.internal = internal
        # the config names the latent channels (the pipeline concatenates), or the conv's (the model does)
        self.config = {"in_channels": 2 * c + 1 if internal else c, "patch_size": (1, 2, 2)}

    def forward(self, hidden_states, encoder_hidden_states=None, condition=None):
        if self.internal:
            hidden_states = torch.cat([hidden_states, condition], dim=1)
        return super().forward(hidden_states, encoder_hidden_states)


class CondConcatBreakDiT(CondConcatDiT):
    """CondConcatDiT with a graph break after its first block: the second block's graph does not hold the video
    input (the probe cannot run there), so it relies on the interpretation confirmed on the first graph."""

    def run_blocks(self, x):
        x = self.blocks[0](x)
        torch._dynamo.graph_break()
        for blk in self.blocks[1:]:
            x = blk(x)
        return x


class CondConcatBlockBreakDiT(CondConcatDiT):
    """CondConcatDiT with a graph break before every block: no attention graph holds the video input, so the
    probe runs the model itself up to the first block."""

    def run_blocks(self, x):
        for blk in self.blocks:
            torch._dynamo.graph_break()
            x = blk(x)
        return x


class FramesFirstDiT(ManualDiT):
    """``(B, F, C, H, W)`` latents, patchified frame by frame with a Conv2d (CogVideoX's layout)."""

    def __init__(self, c=C, **kw):
        super().__init__(in_channels=c, **kw)
        self.patch_embed = nn.Conv2d(c, DIM, kernel_size=2, stride=2)
        self.config = {"in_channels": c, "patch_size": 2}

    def forward(self, hidden_states, encoder_hidden_states=None):
        b = hidden_states.shape[0]
        x = self.patch_embed(hidden_states.flatten(0, 1))  # (B*F, D, h', w')
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, DIM)  # frame-major tokens (B, F*h'*w', D)
        txt = self.text_proj(encoder_hidden_states)
        x = self.run_blocks(torch.cat([txt, x], dim=1))
        return self.proj_out(x[:, txt.shape[1]:])


class _LinearTemporalMix(nn.Module):
    """ReLU linear attention over all video tokens, then a temporal convolution (kernel 3 along frames),
    each with a residual: every token of every frame changes when one frame changes."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.temporal = nn.Conv3d(dim, dim, kernel_size=(3, 1, 1), padding=(1, 0, 0))

    def forward(self, grid):  # (B, D, T, H, W)
        b, d, t, h, w = grid.shape
        x = grid.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k = torch.relu(q), torch.relu(k)
        kv = torch.einsum("bnd,bne->bde", k, v)
        o = torch.einsum("bnd,bde->bne", q, kv) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-6)
        x = x + self.out(o)
        grid = x.transpose(1, 2).reshape(b, d, t, h, w)
        return grid + self.temporal(grid)


class MixingDiT(ManualDiT):
    """ManualDiT with a linear-attention + temporal-conv block between the patch embedding and the softmax
    blocks (``order="HWT"``: the same, but tokens not frame-major afterwards)."""

    def __init__(self, c=C, **kw):
        super().__init__(in_channels=c, **kw)
        self.mix = _LinearTemporalMix()

    def forward(self, hidden_states, encoder_hidden_states=None):
        x = self.mix(self.patch_embed(hidden_states))
        if self.order == "HWT":
            x = x.permute(0, 1, 3, 4, 2)
        x = x.flatten(2).transpose(1, 2)
        txt = self.text_proj(encoder_hidden_states)
        x = self.run_blocks(torch.cat([txt, x], dim=1))
        return self.proj_out(x[:, txt.shape[1]:])


class ListInputDiT(ManualDiT):
    """The video arrives inside a list: ``vision_tokens=[(B, C, T, H, W)]`` or unbatched ``[(C, T, H, W)]``.
    Several videos in the list are packed into one token sequence (concatenated along the tokens)."""

    def __init__(self, c=C, **kw):
        super().__init__(in_channels=c, **kw)
        self.config = {"in_channels": c, "patch_size": (1, 2, 2)}

    def forward(self, vision_tokens, encoder_hidden_states=None):
        videos = [v if v.dim() == 5 else v.unsqueeze(0) for v in vision_tokens]
        x = torch.cat([self.patch_embed(v).flatten(2).transpose(1, 2) for v in videos], dim=1)
        txt = self.text_proj(encoder_hidden_states)
        x = self.run_blocks(torch.cat([txt, x], dim=1))
        return self.proj_out(x[:, txt.shape[1]:])


class PackedPatchesDiT(ManualDiT):
    """Qwen2-VL style: ``hidden_states`` is a 2-D ``(tokens, C*p*p)`` sequence of patches and ``grid_thw`` a
    tensor: the grid is call data, not a shape (refused, with that reason)."""

    def __init__(self, c=C, **kw):
        super().__init__(in_channels=c, **kw)
        self.embed = nn.Linear(4 * c, DIM)
        self.config = {"in_channels": c, "patch_size": (1, 2, 2)}

    def forward(self, hidden_states, grid_thw, encoder_hidden_states=None):
        x = self.embed(hidden_states).unsqueeze(0)
        txt = self.text_proj(encoder_hidden_states)
        x = self.run_blocks(torch.cat([txt, x], dim=1))
        return self.proj_out(x[:, txt.shape[1]:])
