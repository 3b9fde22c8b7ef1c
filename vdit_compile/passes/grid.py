"""The video token grid ``(T', H', W')`` of one transformer call, from its inputs and config.

The capture wrapper records the arguments of the call that triggers a compile; this module
turns them into the number of latent frames, rows and columns of *tokens*, using the input
layout and the patch sizes of the model config:

* ``(B, C, T, H, W)`` (Wan, HunyuanVideo, Mochi, Allegro, Cosmos, EasyAnimate ...),
* ``(B, T, C, H, W)`` (CogVideoX, ConsisID),
* ``(B, T, H, W, C)`` (Kandinsky 5),
* ``(B, N, C)`` pre-patchified with ``num_frames``/``height``/``width`` call arguments (LTX),
* ``(B*T, C, H, W)`` with a ``num_frames`` argument (``TransformerTemporalModel``),
* any of the 5-D layouts, or an unbatched ``(C, T, H, W)`` / ``(T, C, H, W)`` / ``(T, H, W, C)``,
  inside a list, tuple or dict argument (``vision_tokens=[video]``).

A shape alone does not always say which axis holds the channels: 16 latent channels at 16
latent frames, or a conditioning video and mask concatenated to the latents (``2C+1`` input
channels where the config names the ``C`` latent channels).  :func:`grid_candidates` therefore
lists *every* consistent interpretation (each channel axis the layouts allow, each video
tensor of the call), ordered by how well the config supports it, and the detection pass lets
the token-order probe (:mod:`.probe`) confirm one by running the graph; the first confirmed
one wins.  An interpretation needs no probe only when it is ``certain``: the call's main video
input has exactly one axis equal to the config's input channels (or it is one of the
pre-patchified / per-frame layouts, which the call's own ``num_frames`` arguments fix), and no
other axis has a plausible channel count (:func:`channel_counts`).

:func:`infer_grid` keeps the single-answer contract: the certain interpretation, or, where
several axes equal the input channels and a Conv3d patch embedding makes axis 1 the likely
one, that one marked ``guessed`` (sites tiled only once the probe confirms it); otherwise no
grid and a reason naming the candidates.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

_CHANNEL_KEYS = ("in_channels", "in_visual_dim", "in_dim")
#: other config fields holding a channel count of the latents (only order the candidates, never decide)
_LATENT_KEYS = ("latent_channels", "num_channels_latents", "out_channels", "out_visual_dim", "out_dim")
#: words in the name of a config field holding the channels of a conditioning input concatenated to the latents
_COND_WORDS = ("cond", "control", "mask", "image", "ref", "vace")
_PRIORITY = ("hidden_states", "x", "sample", "latents")
#: channel axis -> layout, for batched 5-D and unbatched 4-D video tensors
_LAYOUTS = {5: {1: "BCTHW", 2: "BTCHW", 4: "BTHWC"}, 4: {0: "CTHW", 1: "TCHW", 3: "THWC"}}
_MAX_DEPTH = 3  # nesting of lists/tuples/dicts searched for video tensors


@dataclass(frozen=True)
class GridInfo:
    batch: int
    frames: int
    height: int
    width: int
    source: str
    key: str = ""  # the call argument holding the video (``vision_tokens[0]`` inside a list)
    axes: str = ""  # its layout: BCTHW, BTCHW, BTHWC, CTHW/TCHW/THWC (unbatched), BNC, (BT)CHW
    tensor: object = field(default=None, repr=False, compare=False)  # the video input itself (probe)
    guessed: str = ""  # non-empty: the axes were chosen among several candidates; the probe must confirm them
    basis: str = ""  # why this interpretation was considered (channel axis = which config count, or shape only)
    certain: bool = False  # the only interpretation shape and config allow: used even where the probe cannot run
    group: tuple = ()  # shapes of every video tensor in the same list/tuple/dict (more than one: maybe packed)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    def describe(self) -> str:
        shape = tuple(self.tensor.shape) if isinstance(self.tensor, torch.Tensor) else ()
        why = f", {self.basis}" if self.basis else ""
        return f"{self.key}{shape} as {self.axes}{why} -> {self.frames}x{self.height}x{self.width} tokens"


@dataclass(frozen=True)
class VideoInput:
    """A tensor of the call that may hold the video: where it was found and what sits beside it."""

    path: str  # ``hidden_states``, ``vision_tokens[0]``, ``cond['video']``
    tensor: torch.Tensor
    nested: bool = False  # inside a list / tuple / dict
    group: tuple = ()  # shapes of the video tensors of its container (nested only)


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


def _first_conv(model):
    return next((m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))), None)


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
    conv = _first_conv(model)
    return conv.in_channels if conv is not None else None


def _int_field(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def channel_counts(model) -> dict[int, str]:
    """Channel counts the config and the patch embedding make plausible, each with where it comes from.

    The config's latent/input channels and the first conv's input channels, and their sums with
    conditioning inputs concatenated along the channels: ``2C`` (a conditioning video), ``2C+1`` (and a
    mask), ``C+1``, ``C + k`` for config fields naming conditioning channels, and the latent part of a
    concatenated count.  They only order the interpretations; the probe decides (:func:`grid_candidates`).
    """
    cfg = _config(model)
    base: dict[int, str] = {}
    for key in _CHANNEL_KEYS + _LATENT_KEYS:
        if _int_field(cfg.get(key)):
            base.setdefault(int(cfg[key]), f"config {key}")
    conv = _first_conv(model)
    if conv is not None:
        base.setdefault(int(conv.in_channels), f"{type(conv).__name__} in_channels")
    cond = {k: int(v) for k, v in cfg.items()
            if _int_field(v) and "channel" in k and any(w in k for w in _COND_WORDS)}
    out = dict(base)
    for c, why in base.items():
        derived = [(2 * c, f"2 x {c} ({why}): latents + conditioning video"),
                   (2 * c + 1, f"2 x {c} + 1 ({why}): latents + conditioning video + mask"),
                   (c + 1, f"{c} + 1 ({why}): latents + mask")]
        derived += [(c + k, f"{c} + {k} ({why} + config {name})") for name, k in cond.items()]
        derived += [(c - k, f"{c} - {k} ({why} less config {name})") for name, k in cond.items() if c > k]
        if c > 2:
            derived += [((c - 1) // 2, f"({c} - 1) / 2: the latents of {why} (latents + conditioning + mask)")] if c % 2 \
                else [(c // 2, f"{c} / 2: the latents of {why} (latents + conditioning)")]
        for n, text in derived:
            out.setdefault(n, text)
    return out


def bind_call(model, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (positional ones bound to ``forward``'s signature)."""
    try:  # the class's forward: an instance-level wrapper (offload hooks, ours) has a (*args, **kwargs) signature
        sig = inspect.signature(type(model).forward.__get__(model))
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}


def _walk(value, path: str, depth: int = 0):
    """``(path, tensor, container path)`` of every tensor in nested lists / tuples / dicts."""
    if isinstance(value, torch.Tensor):
        yield path, value, ""
    elif depth < _MAX_DEPTH and isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            sub = f"{path}[{k!r}]" if isinstance(value, dict) else f"{path}[{k}]"
            for p, t, c in _walk(v, sub, depth + 1):
                yield p, t, c or path


def _looks_like_video(t: torch.Tensor, nested: bool) -> bool:
    return t.is_floating_point() and (t.dim() == 5 or nested and t.dim() == 4)


def find_video_inputs(bound: dict) -> list[VideoInput]:
    """The call's tensors that may hold the video, most likely first.

    The conventional argument names (``hidden_states``, ``x``, ``sample``, ``latents``) come first,
    then 5-D floating tensors among the arguments, then 5-D (or unbatched 4-D) ones inside lists,
    tuples and dicts, then any other top-level tensor of 3 or more dims (pre-patchified tokens).
    """
    top = [(k, v) for k, v in bound.items() if isinstance(v, torch.Tensor)]
    nested = [(p, t, c) for k, v in bound.items() if isinstance(v, (list, tuple, dict)) for p, t, c in _walk(v, k)]
    groups: dict[str, list] = {}
    for p, t, c in nested:
        if _looks_like_video(t, True):
            groups.setdefault(c, []).append(tuple(t.shape))
    out: list[VideoInput] = []
    seen: set[int] = set()

    def add(vi: VideoInput):
        if id(vi.tensor) not in seen:
            seen.add(id(vi.tensor))
            out.append(vi)

    for key in _PRIORITY:
        if isinstance(bound.get(key), torch.Tensor):
            add(VideoInput(key, bound[key]))
    for k, v in top:
        if _looks_like_video(v, False):
            add(VideoInput(k, v))
    for p, t, c in nested:
        if _looks_like_video(t, True):
            add(VideoInput(p, t, True, tuple(groups[c])))
    for k, v in top:
        if v.dim() >= 3:
            add(VideoInput(k, v))
    return out


def _found(bound: dict) -> str:
    """What tensors the call holds (for a message saying why none is a usable video)."""
    shown = []
    for k, v in bound.items():
        for p, t, _ in _walk(v, k):
            shown.append(f"{p}{tuple(t.shape)}")
    if not shown:
        return "no tensors at all"
    return ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")


def _grid(vi: VideoInput, b, t, h, w, ps, src, axes, **kw) -> tuple[GridInfo | None, str]:
    pt, ph, pw = ps
    if t % pt or h % ph or w % pw:
        return None, f"{axes}: video {t}x{h}x{w} is not divisible by the patch {pt}x{ph}x{pw}"
    return GridInfo(int(b), t // pt, h // ph, w // pw, f"{vi.path} {src}, patch {pt}x{ph}x{pw}", vi.path, axes,
                    vi.tensor, group=vi.group, **kw), ""


def _video_candidates(model, vi: VideoInput, ps, primary: bool) -> tuple[list[GridInfo], list[str]]:
    """Every channel-axis interpretation of one 5-D (or unbatched 4-D) video tensor, best supported first."""
    x, shape = vi.tensor, tuple(vi.tensor.shape)
    layouts = _LAYOUTS[x.dim()]
    first_axis = min(layouts)  # the channels-first axis: what a Conv3d patch embedding reads
    c = _in_channels(model)
    known = channel_counts(model)
    matches = [d for d in layouts if shape[d] == c] if c is not None else []
    lead: dict[int, dict] = {}
    # another channels-or-frames axis whose size is a plausible count of concatenated channels (16 latent frames
    # next to 2x16+1 channels, config in_channels 16): the axis equal to in_channels leads, but only the probe can tell
    rivals = [d for d in sorted(layouts)[:2] if d not in matches and c is not None and shape[d] in known and shape[d] > c]
    if primary and len(matches) == 1 and rivals:
        lead[matches[0]] = {"basis": (f"channel axis {matches[0]} = in_channels {c} (axis {rivals[0]}, "
                                      f"{known[shape[rivals[0]]]}, may be the channels too)")}
    elif primary and len(matches) == 1:
        lead[matches[0]] = {"certain": True, "basis": f"channel axis {matches[0]} = in_channels {c}"}
    elif primary and len(matches) > 1 and first_axis in matches and _conv3d_patch_embed(model, c):
        # e.g. Wan with 8 latent channels at 8 latent frames: (1, 8, 8, H, W). A Conv3d patch embedding reads
        # (N, C, T, H, W), so the channels-first axis is the likely one; a model that permutes before its Conv3d
        # would make this wrong, so the token-order probe must confirm it (or another axis is tried).
        lead[first_axis] = {"guessed": (f"{vi.path}{shape} has {c} = in_channels on axes {matches}; channel axis "
                                        f"{first_axis} assumed from the Conv3d patch embedding"),
                            "basis": f"channel axis {first_axis} = in_channels {c} (Conv3d patch embedding)"}
    conv = _first_conv(model)
    frames_first = isinstance(conv, torch.nn.Conv2d)  # a per-frame Conv2d patchify reads frames as batch: (B, T, C, H, W)
    order = sorted(layouts, key=lambda d: (d not in lead, shape[d] not in known,
                                           -d if frames_first and d != max(layouts) else d))
    out, notes = [], []
    for d in order:
        lo = 1 if x.dim() == 5 else 0  # unbatched (C, T, H, W) inside a list: batch 1
        rest = [shape[i] for i in range(lo, x.dim()) if i != d]
        b = shape[0] if x.dim() == 5 else 1
        kw = lead.get(d) or {"basis": (f"channel axis {d} = {known[shape[d]]}" if shape[d] in known
                                       else f"channel axis {d} ({shape[d]} channels) from the shape only")}
        g, why = _grid(vi, b, *rest, ps, layouts[d], layouts[d], **kw)
        if g is not None:
            out.append(g)
        else:
            notes.append(f"{vi.path}{shape} {why}")
    return out, notes


def video_axes(model, x: torch.Tensor) -> tuple[GridInfo | None, str]:
    """How one batched 5-D video tensor (``hidden_states``) is laid out, without a probe: export's frame and
    spatial axes come from here, so export and the compile path read a video input the same way.

    The interpretation shape and config fix (``certain``, or the Conv3d patch-embedding guess), else the best
    supported one whose channel axis holds the config's input channels (:func:`_video_candidates`' order);
    ``None`` and why when none does.  Patch sizes play no part (export checks divisibility itself).
    """
    cands, notes = _video_candidates(model, VideoInput("hidden_states", x), (1, 1, 1), primary=True)
    c = _in_channels(model)
    for g in cands[:1]:
        if g.certain or g.guessed or (c is not None and x.shape[g.axes.index("C")] == c):
            return g, ""
    shown = "; ".join(g.describe() for g in cands)
    return None, "; ".join(notes) or f"config in_channels={c}; interpretations: {shown}"


def grid_candidates(model, args: tuple, kwargs: dict) -> tuple[list[GridInfo], str]:
    """Every consistent interpretation of the call's video input(s), most likely first, and what was ruled out.

    The first entry is ``certain`` where the shape and config leave no choice; otherwise the token-order
    probe must confirm one (:func:`vdit_compile.passes.probe.select_grid`).  No entry: the reason says what
    was found and why none of it gives a grid.
    """
    bound = bind_call(model, args, kwargs)
    videos = find_video_inputs(bound)
    if not videos:
        return [], f"no video tensor (5-D, or 4-D inside a list) among the call's inputs; found {_found(bound)}"
    num_frames, height, width = (bound.get(n) for n in ("num_frames", "height", "width"))
    ps = patch_sizes(model)
    x0 = videos[0].tensor
    if ps is None and x0.dim() == 4 and not videos[0].nested and isinstance(num_frames, int):
        ps = (1, 1, 1)  # (B*T, C, H, W) temporal-only models attend per pixel
    if ps is None:
        return [], (f"no patch size in the model config and no patchifying convolution "
                    f"(input {videos[0].path}{tuple(x0.shape)})")
    c = _in_channels(model)
    cands: list[GridInfo] = []
    notes: list[str] = []
    for i, vi in enumerate(videos):
        x, key, shape = vi.tensor, vi.path, tuple(vi.tensor.shape)
        if x.dim() == 5 or vi.nested and x.dim() == 4:
            got, why = _video_candidates(model, vi, ps, primary=i == 0)
            cands += got
            notes += why
        elif x.dim() == 3 and all(isinstance(n, int) for n in (num_frames, height, width)):
            pt, ph, pw = ps
            if num_frames * height * width != shape[1]:
                notes.append(f"{key}{shape} does not hold num_frames*height*width = {num_frames}*{height}*{width} tokens")
                continue
            cands.append(GridInfo(shape[0], num_frames, height, width, f"{key} BNC+num_frames/height/width, patch "
                                  f"{pt}x{ph}x{pw}", key, "BNC", x, basis="num_frames/height/width arguments",
                                  certain=i == 0))
        elif x.dim() == 4 and isinstance(num_frames, int) and num_frames > 0 and shape[0] % num_frames == 0:
            if c is not None and shape[1] != c:
                notes.append(f"cannot tell the channel axis of {key}{shape} (config in_channels={c})")
                continue
            g, why = _grid(vi, shape[0] // num_frames, num_frames, *shape[2:], (1, ps[1], ps[2]), "(BT)CHW+num_frames",
                           "(BT)CHW", basis="num_frames argument", certain=i == 0)
            cands += [g] if g is not None else []
            notes += [f"{key}{shape} {why}"] if why else []
        elif x.dim() == 2:
            grids = [f"{k}{tuple(v.shape)}" for k, v in bound.items()
                     if isinstance(v, torch.Tensor) and ("grid" in k or "thw" in k)]
            notes.append(f"{key}{shape} is a packed token sequence (tokens x features) with no batch, frame, height or "
                         f"width axis" + (f"; its grid is call data ({', '.join(grids)}), not a shape" if grids else "")
                         + ": one frame-major grid cannot be recovered from it")
        elif i == 0 and key not in _PRIORITY and x.dim() == 3:
            notes.append(f"no video tensor (5-D, or 4-D inside a list) among the call's inputs; found {_found(bound)} "
                         f"(a 3-D tensor is read as (B, N, C) video tokens only with num_frames/height/width arguments)")
        elif i == 0:
            notes.append(f"unsupported video input {key}{shape} (expected 5-D video, or (B, N, C) with "
                         f"num_frames/height/width)")
    if cands and not (cands[0].certain or cands[0].guessed) and cands[0].key == videos[0].path \
            and videos[0].tensor.dim() in (4, 5):
        shape = tuple(videos[0].tensor.shape)
        notes.insert(0, f"cannot tell the channel axis of {videos[0].path}{shape} (config in_channels={c})")
    reason = "; ".join(notes)
    if not cands:
        return [], reason or f"no usable video tensor among the call's inputs; found {_found(bound)}"
    return cands, reason


def infer_grid(model, args: tuple, kwargs: dict) -> tuple[GridInfo | None, str]:
    """``(grid, reason)``: the token grid of this call when shape and config fix it (or the Conv3d guess),
    else ``None`` and why; :func:`grid_candidates` gives every interpretation for the probe to decide."""
    cands, why = grid_candidates(model, args, kwargs)
    if cands and (cands[0].certain or cands[0].guessed):
        return cands[0], ""
    if cands:
        return None, f"{why}; interpretations for the token-order probe: " + "; ".join(g.describe() for g in cands)
    return None, why
