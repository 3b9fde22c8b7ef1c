"""Tiny random configs of the diffusers video transformers vdit-compile must handle.

Shared by the core, export and parallel tests: ``build_tiny(name) -> (model, example_kwargs)``
builds a 2-layer, 2-head x 16 model in fp32 eval mode with a deterministic seed, and example
forward kwargs for 4 latent frames of 8x8 and 8 text tokens.  ``EXPECTED`` says, per model,
what the detection pass must find: the number of tileable sites, their kind and token layout
(``None`` where the model is detected and deliberately left dense).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

B, C, T, HH, WW, TEXT = 1, 6, 4, 8, 8, 8
HEADS, HEAD_DIM = 2, 16
DIM = HEADS * HEAD_DIM


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def _video(seed=1, channels=C, frames=T):
    return _randn(B, channels, frames, HH, WW, seed=seed)


def _text(dim, n=TEXT, seed=2):
    return _randn(B, n, dim, seed=seed)


def _t():
    return torch.tensor([500], dtype=torch.long)


class ManualDiT(nn.Module):
    """A hand-written video DiT whose attention is ``softmax(q @ k^T * scale) @ v`` (no SDPA).

    Conv3d patchify to frame-major tokens, text appended as a prefix (joint attention), two
    blocks; one block uses ``matmul``, the other ``einsum`` + ``baddbmm``-free bmm to cover the
    hand-written forms the detection pass recognises.
    """

    def __init__(self, in_channels=C, dim=DIM, heads=HEADS, text_dim=24, layers=2, patch=(1, 2, 2), order="THW",
                 text_side="prefix"):
        super().__init__()
        self.patch, self.order, self.text_side = patch, order, text_side  # text_side: prefix | suffix | both
        self.heads = heads
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(_ManualBlock(dim, heads, form="matmul" if i % 2 == 0 else "einsum") for i in range(layers))
        self.proj_out = nn.Linear(dim, in_channels * patch[0] * patch[1] * patch[2])

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None):
        b, c, t, h, w = hidden_states.shape
        x = self.patch_embed(hidden_states)
        if self.order == "HWT":  # frame-minor: detection confirms it and the op reorders the tokens
            x = x.permute(0, 1, 3, 4, 2)
        elif self.order == "WTH":  # neither frame-major nor frame-minor: detection must leave it dense
            x = x.permute(0, 1, 4, 2, 3)
        x = x.flatten(2).transpose(1, 2)
        n, video = 0, x.shape[1]
        if encoder_hidden_states is not None:  # joint attention over text + video; else video self-attention
            txt = self.text_proj(encoder_hidden_states)
            if encoder_attention_mask is not None:  # batch 1: keep the valid tokens (a length known per call only)
                txt = txt[:, encoder_attention_mask[0].bool()]
            n = txt.shape[1] if self.text_side != "suffix" else 0
            parts = {"prefix": [txt, x], "suffix": [x, txt], "both": [txt, x, txt]}[self.text_side]
            x = torch.cat(parts, dim=1)
        x = self.run_blocks(x)
        return self.proj_out(x[:, n:n + video])

    def run_blocks(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class ManualDiTGraphBreak(ManualDiT):
    """ManualDiT with a graph break in its block loop: Dynamo gives up on the loop's frame and
    compiles each block's own frame, one graph shared by all blocks of a form (its own class, so
    the skip Dynamo records for this code object does not affect :class:`ManualDiT`)."""

    def run_blocks(self, x):
        for blk in self.blocks:
            x = blk(x)
            torch._dynamo.graph_break()
        return x


class _ManualBlock(nn.Module):
    def __init__(self, dim, heads, form):
        super().__init__()
        self.heads, self.form = heads, form
        self.attn_override = None
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scale = (d // self.heads) ** -0.5
        if self.attn_override is not None:  # tests: an independent (masked) attention for this block
            o = self.attn_override(q, k, v, scale)
        elif self.form == "matmul":
            attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
            o = torch.matmul(attn, v)
        else:
            attn = torch.einsum("bhid,bhjd->bhij", q * scale, k).softmax(dim=-1)
            o = torch.einsum("bhij,bhjd->bhid", attn, v)
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


def _cogvideox(v15=False):
    from diffusers import CogVideoXTransformer3DModel

    kw = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C, time_embed_dim=8,
              text_embed_dim=24, num_layers=2, sample_width=WW, sample_height=HH, sample_frames=9 if not v15 else 8,
              patch_size=2, max_text_seq_length=TEXT, temporal_compression_ratio=4)
    if v15:
        kw.update(patch_size_t=2, use_rotary_positional_embeddings=True, ofs_embed_dim=None, sample_frames=8 * 4 // 1)
    m = CogVideoXTransformer3DModel(**kw)
    frames = 8 if v15 else T
    kwargs = dict(hidden_states=_randn(B, frames, C, HH, WW, seed=1), encoder_hidden_states=_text(24), timestep=_t())
    if v15:
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cos, sin = get_3d_rotary_pos_embed(HEAD_DIM, crops_coords=None, grid_size=(HH // 2, WW // 2), temporal_size=frames // 2,
                                           grid_type="slice", max_size=(HH // 2, WW // 2))
        kwargs["image_rotary_emb"] = (cos, sin)
    return m, kwargs


def _consisid():
    from diffusers import ConsisIDTransformer3DModel

    m = ConsisIDTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
                                   time_embed_dim=8, text_embed_dim=24, num_layers=2, sample_width=WW, sample_height=HH,
                                   sample_frames=9, patch_size=2, max_text_seq_length=TEXT, is_train_face=False)
    return m, dict(hidden_states=_randn(B, T, C, HH, WW, seed=1), encoder_hidden_states=_text(24), timestep=_t())


def _easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    m = EasyAnimateTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
                                      patch_size=2, sample_width=WW, sample_height=HH, time_embed_dim=8, num_layers=2,
                                      mmdit_layers=2, text_embed_dim=24, enable_text_attention_mask=False)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _wan_kw():
    return dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
                text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**_wan_kw()), dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _wanvace():
    from diffusers import WanVACETransformer3DModel

    m = WanVACETransformer3DModel(**_wan_kw(), vace_layers=[0], vace_in_channels=8)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24),
                   control_hidden_states=_video(seed=3, channels=8), control_hidden_states_scale=torch.ones(1))


def _skyreels():
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**_wan_kw()), dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _allegro():
    from diffusers import AllegroTransformer3DModel

    m = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=C, out_channels=C, num_layers=2, cross_attention_dim=DIM, sample_height=HH,
                                  sample_width=WW, sample_frames=T, caption_channels=24)
    return m, dict(hidden_states=_video(), encoder_hidden_states=_text(24), timestep=_t())


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(in_channels=C, out_channels=C, patch_size=1, patch_size_t=1, num_attention_heads=HEADS,
                                   attention_head_dim=HEAD_DIM, cross_attention_dim=DIM, num_layers=2, caption_channels=24)
    n = T * HH * WW // 4
    return m, dict(hidden_states=_randn(B, n, C, seed=1), encoder_hidden_states=_text(24), timestep=_t(),
                   encoder_attention_mask=torch.ones(B, TEXT), num_frames=T, height=HH // 2, width=WW // 2,
                   rope_interpolation_scale=(1.0, 1.0, 1.0))


def _ltx2():
    from diffusers import LTX2VideoTransformer3DModel

    m = LTX2VideoTransformer3DModel(in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                    cross_attention_dim=DIM, audio_in_channels=C, audio_out_channels=C,
                                    audio_num_attention_heads=HEADS, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                                    num_layers=2, caption_channels=24, pos_embed_max_pos=20, base_height=64, base_width=64)
    n = T * HH * WW // 4
    return m, dict(hidden_states=_randn(B, n, C, seed=1), audio_hidden_states=_randn(B, 6, C, seed=4),
                   encoder_hidden_states=_text(24), audio_encoder_hidden_states=_text(24, seed=5), timestep=_t(),
                   num_frames=T, height=HH // 2, width=WW // 2, audio_num_frames=6)


def _mochi():
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
                                pooled_projection_dim=16, in_channels=C, text_embed_dim=24, time_embed_dim=8,
                                max_sequence_length=TEXT)
    return m, dict(hidden_states=_video(), encoder_hidden_states=_text(24), timestep=_t(),
                   encoder_attention_mask=torch.ones(B, TEXT, dtype=torch.bool))


def _hunyuan_kw():
    return dict(in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
                pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(**_hunyuan_kw(), guidance_embeds=False)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24),
                   encoder_attention_mask=torch.ones(B, TEXT), pooled_projections=_randn(B, 16, seed=6))


def _hunyuan15():
    from diffusers import HunyuanVideo15Transformer3DModel

    m = HunyuanVideo15Transformer3DModel(in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                         num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=24,
                                         text_embed_2_dim=24, image_embed_dim=24, rope_axes_dim=(4, 6, 6), task_type="t2v")
    return m, dict(hidden_states=_randn(B, C, T, HH // 2, WW // 2, seed=1), timestep=torch.tensor([500.0]), encoder_hidden_states=_text(24),
                   encoder_attention_mask=torch.ones(B, TEXT), encoder_hidden_states_2=_text(24, seed=7),
                   encoder_attention_mask_2=torch.ones(B, TEXT), image_embeds=_randn(B, 4, 24, seed=8))


def _framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    m = HunyuanVideoFramepackTransformer3DModel(**_hunyuan_kw(), guidance_embeds=False, has_image_proj=True, image_proj_dim=24,
                                                has_clean_x_embedder=True)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24),
                   encoder_attention_mask=torch.ones(B, TEXT), pooled_projections=_randn(B, 16, seed=6),
                   image_embeds=_randn(B, 4, 24, seed=8), indices_latents=torch.arange(T),
                   latents_clean=_video(seed=9, frames=1), indices_latents_clean=torch.arange(T, T + 1),
                   latents_history_2x=_video(seed=10, frames=2), indices_latents_history_2x=torch.arange(T + 1, T + 3),
                   latents_history_4x=_video(seed=11, frames=4), indices_latents_history_4x=torch.arange(T + 3, T + 7))


def _motif():
    from diffusers import MotifVideoTransformer3DModel

    m = MotifVideoTransformer3DModel(in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                     num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
                                     rope_axes_dim=(4, 6, 6))
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    m = Kandinsky5Transformer3DModel(in_visual_dim=C, in_text_dim=24, in_text_dim2=16, time_dim=16, out_visual_dim=C,
                                     patch_size=(1, 2, 2), model_dim=DIM, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                                     axes_dims=(4, 6, 6))
    return m, dict(hidden_states=_randn(B, T, HH, WW, C, seed=1), encoder_hidden_states=_text(24), timestep=torch.tensor([500.0]),
                   pooled_projections=_randn(B, 16, seed=6), visual_rope_pos=[torch.arange(T), torch.arange(HH // 2), torch.arange(WW // 2)],
                   text_rope_pos=torch.arange(TEXT))


def _cosmos():
    from diffusers import CosmosTransformer3DModel

    m = CosmosTransformer3DModel(in_channels=C, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 num_layers=2, text_embed_dim=24, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
                                 concat_padding_mask=False, extra_pos_embed_type=None)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _latte():
    from diffusers import LatteTransformer3DModel

    m = LatteTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
                                num_layers=1, cross_attention_dim=DIM, sample_size=HH, patch_size=2, caption_channels=24,
                                norm_type="ada_norm_single", video_length=T)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=_text(24))


def _temporal():
    from diffusers import TransformerTemporalModel

    m = TransformerTemporalModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
                                 num_layers=1, norm_num_groups=2)
    return m, dict(hidden_states=_randn(B * T, C, HH, WW, seed=1), num_frames=T)


def _manual():
    return ManualDiT(), dict(hidden_states=_video(), encoder_hidden_states=_text(24))


BUILDERS = {
    "cogvideox": _cogvideox,
    "cogvideox15": lambda: _cogvideox(v15=True),
    "consisid": _consisid,
    "easyanimate": _easyanimate,
    "wan": _wan,
    "wanvace": _wanvace,
    "skyreels_v2": _skyreels,
    "allegro": _allegro,
    "ltx": _ltx,
    "ltx2": _ltx2,
    "mochi": _mochi,
    "hunyuan": _hunyuan,
    "hunyuan15": _hunyuan15,
    "framepack": _framepack,
    "motif": _motif,
    "kandinsky5": _kandinsky5,
    "cosmos": _cosmos,
    "manual": _manual,
    "latte": _latte,
    "temporal": _temporal,
}
NAMES = list(BUILDERS)


@dataclass(frozen=True)
class Expect:
    """What detection must report for a tiny model.

    ``tiled``: number of tileable sites, all of ``kind`` with token layout ``layout``
    ``(T, H, W, text_prefix, text_suffix)`` (a per-call text side, ``dynamic``, counts 0 there).
    ``dense3d``: 3D sites detected but left dense, each with a reason containing ``reason``.
    ``kinds``: other kinds that must be present.
    """

    tiled: int
    kind: str | None = None
    layout: tuple | None = None
    dense3d: int = 0
    reason: str = ""
    kinds: tuple = ()
    dynamic: str = ""  # the text side whose length is trimmed by value (known per call only)


_GRID = (T, HH // 2, WW // 2)
EXPECTED = {
    "cogvideox": Expect(2, "joint_text_prefix", (*_GRID, TEXT, 0)),
    "cogvideox15": Expect(2, "joint_text_prefix", (*_GRID, TEXT, 0)),
    "consisid": Expect(2, "joint_text_prefix", (*_GRID, TEXT, 0)),
    "easyanimate": Expect(2, "joint_text_prefix", (*_GRID, TEXT, 0)),
    "wan": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "wanvace": Expect(3, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "skyreels_v2": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "allegro": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "ltx": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "ltx2": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross", "other")),
    "mochi": Expect(2, "joint_text_suffix", (*_GRID, 0, 0), dynamic="suffix", kinds=("other",)),
    "hunyuan": Expect(2, "joint_text_suffix", (*_GRID, 0, TEXT), kinds=("other",)),
    "hunyuan15": Expect(2, "joint_text_suffix", (*_GRID, 0, 0), dynamic="suffix", kinds=("other",)),
    # history (1 + 4 tokens) and clean-latent (16) tokens are packed before the video: a fixed prefix
    "framepack": Expect(2, "joint_text_suffix", (*_GRID, 21, 0), dynamic="suffix", kinds=("other",)),
    "motif": Expect(2, "joint_text_suffix", (*_GRID, 0, TEXT)),
    "kandinsky5": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross", "other")),
    "cosmos": Expect(2, "video_self", (*_GRID, 0, 0), kinds=("cross",)),
    "manual": Expect(2, "joint_text_prefix", (*_GRID, TEXT, 0)),
    "latte": Expect(0, kinds=("spatial", "temporal")),
    "temporal": Expect(0, kinds=("temporal",)),
}


def with_valid_text(name: str, kwargs: dict, n: int) -> dict:
    """``kwargs`` of a HunyuanVideo-family or Mochi model whose prompt has ``n`` of ``TEXT`` valid tokens (the
    rest padding, as pipelines pass it): same shapes, so one compiled graph must serve every ``n``."""
    key = "encoder_attention_mask"
    if name == "manual":  # ManualDiT trims its text by this mask
        kwargs = dict(kwargs, **{key: torch.ones(B, TEXT, dtype=torch.bool)})
    if key not in kwargs or name not in ("mochi", "hunyuan", "hunyuan15", "framepack", "manual"):
        raise KeyError(f"{name!r} takes no text padding mask")
    mask = torch.zeros_like(kwargs[key])
    mask[:, :n] = 1
    return dict(kwargs, **{key: mask})


def batch_of_two(name: str, kwargs: dict, n: int) -> dict:
    """``kwargs`` with batch 2: row 1 holds other values (flipped features) and only ``n`` valid text tokens."""
    out = {}
    for key, val in kwargs.items():
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[0] == 1 and not key.startswith("indices"):
            other = val.flip(-1) if val.dtype.is_floating_point and val.dim() > 1 else val
            val = torch.cat([val, other])
        out[key] = val
    mask = out["encoder_attention_mask"].clone()
    mask[1, n:] = 0
    return dict(out, encoder_attention_mask=mask)


def build_tiny(name: str):
    """``(model, example_kwargs)`` for one of :data:`NAMES`: fp32, eval mode, seeded weights."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; expected one of {NAMES}")
    torch.manual_seed(0)
    model, kwargs = BUILDERS[name]()
    with torch.no_grad():  # zero-initialised gates/outputs (adaLN-zero) would hide the attention
        for p in model.parameters():
            if p.dtype.is_floating_point and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=_g(p.numel())))
    return model.eval().float(), kwargs


# ----------------------------------------------------------------------------- the independent oracle


def out_of(o):
    """The output tensor of a model call (tuple, ``.sample`` or tensor)."""
    return o[0] if isinstance(o, (tuple, list)) else getattr(o, "sample", o)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class MaskedSDPA(TorchFunctionMode):
    """Replaces the i-th SDPA call by dense SDPA with the tile mask's boolean ``L x L`` equivalent when
    ``sites[i]`` is tileable.  A site whose text length is per call gets this call's layout; a boolean
    text-padding mask the model passes is and-ed in (an additive one must keep everything)."""

    def __init__(self, sites, mask):
        super().__init__()
        self.sites, self.mask, self.calls = sites, mask, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from vdit_compile.ops import dense_masked_attention
        from vdit_compile.passes.attention import _SDPA_SIG

        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            site = self.sites[self.calls]
            self.calls += 1
            if site.tileable:
                a = _SDPA_SIG.bind(*args, **kwargs).arguments
                q, k, v, am = a["query"], a["key"], a["value"], a.get("attn_mask")
                if am is not None and am.dtype != torch.bool:
                    assert bool((am == 0).all()), "oracle expects boolean padding masks"
                    am = None
                scale = a.get("scale") or q.shape[-1] ** -0.5
                fm = self.mask.frame_mask(site.layout.num_frames)
                lay = site.layout.resolve(q.shape[-2]) if site.layout.is_dynamic else site.layout  # this call's text
                return dense_masked_attention(q, k, v, lay, fm, scale, attn_mask=am)
        return func(*args, **kwargs)


def reference_output(name, model, kwargs, sites, mask):
    """The original model, eager, with the masked-dense oracle at its tileable sites."""
    if name == "manual":
        tiled = [s for s in sites if s.tileable]
        for blk, site in zip(model.blocks, tiled):
            from vdit_compile.ops import dense_masked_attention

            fm = mask.frame_mask(site.layout.num_frames)
            blk.attn_override = lambda q, k, v, scale, s=site, fm=fm: dense_masked_attention(
                q, k, v, s.layout.resolve(q.shape[-2]) if s.layout.is_dynamic else s.layout, fm, scale)
        try:
            return out_of(model(**kwargs))
        finally:
            for blk in model.blocks:
                blk.attn_override = None
    mode = MaskedSDPA(sites, mask)
    with mode:
        out = out_of(model(**kwargs))
    assert mode.calls == len(sites), f"{mode.calls} SDPA calls, {len(sites)} sites"
    return out
