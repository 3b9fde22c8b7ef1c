"""The video token grid ``(T', H', W')`` of one transformer call, from its inputs and config.

The capture wrapper records the arguments of the call that triggers a compile; this module
turns them into the number of latent frames, rows and columns of *tokens*, using the input
layout and the patch sizes of the model config:

* ``(B, C, T, H, W)`` (Wan, HunyuanVideo, Mochi, Allegro, Cosmos, EasyAnimate ...),
* ``(B, T, C, H, W)`` (CogVideoX, ConsisID),
* ``(B, T, H, W, C)`` (Kandinsky 5),
* ``(B, N, C)`` pre-patchified with ``num_frames``/``height``/``width`` call arguments (LTX),
* ``(B*T, C, H, W)`` with a ``num_frames`` argument (``TransformerTemporalModel``).

The channel axis is the one whose size equals the config's input channels. When several axes
match (e.g. 8 channels at 8 frames) and the model patchifies with a Conv3d, axis 1 is assumed and
the grid is marked ``guessed``: its sites are tiled only after the token-order probe confirms the
frame order (passes/detect.py), else left dense. Otherwise, when the axis is ambiguous or a size is
not divisible by the patch, no grid is returned and the reason says why (sites are left dense).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

_CHANNEL_KEYS = ("in_channels", "in_visual_dim", "in_dim")


@dataclass(frozen=True)
class GridInfo:
    batch: int
    frames: int
    height: int
    width: int
    source: str
    key: str = ""  # the call argument holding the video
    axes: str = ""  # its layout: BCTHW, BTCHW, BTHWC, BNC, (BT)CHW
    tensor: object = field(default=None, repr=False, compare=False)  # the video input itself (probe)
    guessed: str = ""  # non-empty: the axes were chosen among several candidates; the probe must confirm them

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width


def _config(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return dict(cfg) if not isinstance(cfg, dict) else cfg


def patch_sizes(model) -> tuple[int, int, int] | None:
    """``(pt, ph, pw)`` from ``config.patch_size`` / ``patch_size_t``, else from a patchifying conv."""
    cfg = _config(model)
    p = cfg.get("patch_size")
    if p is not None:
        pt = cfg.get("patch_size_t") or 1
        if isinstance(p, (tuple, list)):
            if len(p) == 3:
                return int(p[0]), int(p[1]), int(p[2])
            if len(p) == 2:
                return int(pt), int(p[0]), int(p[1])
        return int(pt), int(p), int(p)
    for mod in model.modules():  # a bare module: the first strided conv is the patch embedding
        if isinstance(mod, torch.nn.Conv3d) and mod.stride == mod.kernel_size:
            return tuple(int(s) for s in mod.stride)
        if isinstance(mod, torch.nn.Conv2d) and mod.stride == mod.kernel_size and mod.stride != (1, 1):
            return (1, int(mod.stride[0]), int(mod.stride[1]))
    return None


def _conv3d_patch_embed(model, channels: int) -> bool:
    """True when the model's first Conv3d is a patchifying one reading ``channels`` input channels."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv3d):
            return mod.in_channels == channels and mod.stride == mod.kernel_size
    return False


def _in_channels(model) -> int | None:
    cfg = _config(model)
    for key in _CHANNEL_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv3d, torch.nn.Conv2d)):
            return mod.in_channels
    return None


def bind_call(model, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (positional ones bound to ``forward``'s signature)."""
    try:  # the class's forward: an instance-level wrapper (offload hooks, ours) has a (*args, **kwargs) signature
        sig = inspect.signature(type(model).forward.__get__(model))
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}


def _video_input(bound: dict):
    for key in ("hidden_states", "x", "sample", "latents"):
        if isinstance(bound.get(key), torch.Tensor):
            return key, bound[key]
    for key, val in bound.items():
        if isinstance(val, torch.Tensor) and val.dim() >= 3:
            return key, val
    return None, None


def infer_grid(model, args: tuple, kwargs: dict) -> tuple[GridInfo | None, str]:
    """``(grid, reason)``: the token grid of this call, or ``None`` and why it is unknown."""
    bound = bind_call(model, args, kwargs)
    key, x = _video_input(bound)
    if x is None:
        return None, "no video tensor among the call's inputs"
    num_frames, height, width = (bound.get(n) for n in ("num_frames", "height", "width"))
    ps = patch_sizes(model)
    if ps is None and x.dim() == 4 and isinstance(num_frames, int):
        ps = (1, 1, 1)  # (B*T, C, H, W) temporal-only models attend per pixel
    if ps is None:
        return None, f"no patch size in the model config and no patchifying convolution (input {key}{tuple(x.shape)})"
    pt, ph, pw = ps
    c = _in_channels(model)
    shape = tuple(x.shape)
    guessed = ""  # set only when a 5-D input's channel axis had to be chosen among several
    if x.dim() == 5:
        axes = [d for d in (1, 2, 4) if shape[d] == c] if c is not None else []
        if len(axes) > 1 and 1 in axes and _conv3d_patch_embed(model, c):
            # e.g. Wan with 8 latent channels at 8 latent frames: (1, 8, 8, H, W). A Conv3d patch embedding
            # reads (N, C, T, H, W), so axis 1 is the likely channel axis; a model that permutes before its
            # Conv3d would make this wrong, so the token-order probe must confirm it (detect.py) or the
            # sites stay dense.
            axes, guessed = [1], (f"{key}{shape} has {c} = in_channels on axes {axes}; channel axis 1 assumed "
                                  f"from the Conv3d patch embedding")
        if len(axes) != 1:
            return None, f"cannot tell the channel axis of {key}{shape} (config in_channels={c})"
        ch = axes[0]
        t, h, w = [shape[d] for d in range(1, 5) if d != ch]
        b, src = shape[0], {1: "BCTHW", 2: "BTCHW", 4: "BTHWC"}[ch]
    elif x.dim() == 3 and all(isinstance(n, int) for n in (num_frames, height, width)):
        b, t, h, w, src = shape[0], num_frames * pt, height * ph, width * pw, "BNC+num_frames/height/width"
        if t // pt * (h // ph) * (w // pw) != shape[1]:
            return None, f"{key}{shape} does not hold num_frames*height*width = {num_frames}*{height}*{width} tokens"
    elif x.dim() == 4 and isinstance(num_frames, int) and num_frames > 0 and shape[0] % num_frames == 0:
        if c is not None and shape[1] != c:
            return None, f"cannot tell the channel axis of {key}{shape} (config in_channels={c})"
        b, t, (h, w), src = shape[0] // num_frames, num_frames, shape[2:], "(BT)CHW+num_frames"
        pt = 1
    else:
        return None, f"unsupported video input {key}{shape} (expected 5-D video, or (B, N, C) with num_frames/height/width)"
    if t % pt or h % ph or w % pw:
        return None, f"video {t}x{h}x{w} is not divisible by the patch {pt}x{ph}x{pw}"
    return GridInfo(int(b), t // pt, h // ph, w // pw, f"{key} {src}, patch {pt}x{ph}x{pw}", key, src.split("+")[0], x,
                    guessed), ""
