"""Procedural text-to-video data: clips generated on the fly, deterministic from a seed.

Why: no video data set or pretrained DiT can be downloaded here, yet calibration and distillation only mean
something on a model whose attention has real spatio-temporal structure. These clips have that structure
(objects that move, bounce, grow, shrink and rotate over a coloured, optionally textured background), and
every clip carries its caption and the attributes it was built from, so a classifier can check whether a
generated clip shows what its prompt asked for.

Layout of a clip: float tensor (T, 3, H, W) in [0, 1], T = 16 frames of 32 x 32 RGB by default (pixel space,
no VAE): with patch (1, 4, 4) that is 8 x 8 = 64 tokens per frame.

Entry points:
  * ``sample_attributes(seed)`` -> attributes dict (pure Python ``random.Random(seed)``; the seed fixes the clip);
  * ``render(attributes_list, device)`` -> (B, T, 3, H, W), vectorised torch, CPU or GPU;
  * ``sample_clip(seed)`` -> (video, caption, attributes);
  * ``sample_batch(seeds=None, batch=None, generator=None, device="cpu")`` -> (videos, captions, attributes);
  * ``caption_of(attributes)`` / ``parse_caption(caption)`` -> the two directions between words and attributes.
``sample_batch(seeds=[s])[0][0]`` equals ``sample_clip(s)[0]`` on the same device.
"""
from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

import torch

from ..procedural import SHAPES, check_seed, draw_seeds, shape_layer, to_device

NUM_FRAMES = 16
HEIGHT = 32
WIDTH = 32

# Bright, mutually distant colours; backgrounds are dark so every object stands out.
COLOURS = {
    "red": (0.95, 0.12, 0.12),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.10),
    "cyan": (0.10, 0.90, 0.90),
    "magenta": (0.90, 0.15, 0.85),
}
BACKGROUNDS = {
    "black": (0.02, 0.02, 0.02),
    "gray": (0.30, 0.30, 0.30),
    "dark blue": (0.04, 0.07, 0.32),
    "dark green": (0.04, 0.26, 0.07),
    "dark red": (0.32, 0.06, 0.04),
}
TEXTURES = ("plain", "checkered", "striped")
SIZES = {"small": 3.5, "large": 6.5}  # object "radius" in pixels at 32 x 32
MOTIONS = ("left", "right", "up", "down", "diagonal", "bounce", "grow", "shrink", "rotate")
SPEEDS = {"slowly": 0.6, "steadily": 1.0, "quickly": 1.5}  # speed factor
# Motion -> caption phrase (a few words, all in VOCAB).
MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "diagonal": "moving diagonally",
    "bounce": "bouncing",
    "grow": "growing",
    "shrink": "shrinking",
    "rotate": "rotating",
}
# A circle looks the same at every angle, so a "rotating circle" would be a lie: rotate never picks it.
ROTATABLE_SHAPES = tuple(s for s in SHAPES if s != "circle")
SECOND_OBJECT_PROB = 0.25

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZE_NAMES = tuple(SIZES)
SPEED_NAMES = tuple(SPEEDS)

# Attribute name -> list of values (the classes a classifier can be trained on).
ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "size": SIZE_NAMES,
    "motion": MOTIONS,
    "speed": SPEED_NAMES,
    "background": BACKGROUND_NAMES,
    "texture": TEXTURES,
}


def _vocab() -> tuple[str, ...]:
    words = ["a", "and", "over", "background"]
    words += list(SHAPES) + list(SIZES) + list(SPEEDS) + [t for t in TEXTURES if t != "plain"]
    for name in list(COLOURS) + list(BACKGROUNDS):
        words += name.split()
    for phrase in MOTION_PHRASES.values():
        words += phrase.split()
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


VOCAB: tuple[str, ...] = _vocab()  # every word any caption can contain


# ----------------------------------------------------------------------------------------------- attributes
def _sample_object(rng: random.Random, avoid: dict | None = None) -> dict:
    while True:
        motion = rng.choice(MOTIONS)
        shape = rng.choice(ROTATABLE_SHAPES if motion == "rotate" else SHAPES)
        colour = rng.choice(COLOUR_NAMES)
        if avoid is None or (shape, colour) != (avoid["shape"], avoid["colour"]):
            break
    return {
        "shape": shape,
        "colour": colour,
        "size": rng.choice(SIZE_NAMES),
        "motion": motion,
        "speed": rng.choice(SPEED_NAMES),
        # Placement jitter (pixels) and the starting angle; not in the caption, fixed by the seed.
        "jitter_x": rng.uniform(-3.0, 3.0),
        "jitter_y": rng.uniform(-3.0, 3.0),
        "angle0": rng.uniform(0.0, math.pi / 2),
    }


def sample_attributes(seed: int, second_object_prob: float = SECOND_OBJECT_PROB) -> dict:
    """Attributes of the clip with this seed: the first object's keys at top level, plus background,
    texture and ``second`` (the second object's dict, or None)."""
    rng = random.Random(check_seed(seed))
    attrs = _sample_object(rng)
    attrs["background"] = rng.choice(BACKGROUND_NAMES)
    attrs["texture"] = rng.choice(TEXTURES)
    attrs["second"] = _sample_object(rng, avoid=attrs) if rng.random() < second_object_prob else None
    if attrs["second"] is not None:
        # Keep the two objects apart: the first lives in the upper half, the second in the lower half.
        attrs["lane"], attrs["second"]["lane"] = -1, 1
    else:
        attrs["lane"] = 0
    attrs["seed"] = seed
    return attrs


def _object_phrase(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']} {MOTION_PHRASES[o['motion']]} {o['speed']}"


def caption_of(attrs: dict) -> str:
    """Caption built from the attributes, e.g. 'a small red circle moving left slowly over a dark blue background'."""
    text = _object_phrase(attrs)
    if attrs.get("second"):
        text += " and " + _object_phrase(attrs["second"])
    tex = attrs.get("texture", "plain")
    bg = attrs["background"] if tex == "plain" else f"{attrs['background']} {tex}"
    return f"{text} over a {bg} background"


def _parse_object(words: list[str], caption: str) -> dict:
    def fail(what: str):
        raise ValueError(f"cannot parse caption {caption!r}: expected {what}, found {' '.join(words[:4])!r}")

    if len(words) < 5 or words[0] != "a":
        fail("'a <size> <colour> <shape> <motion> <speed>'")
    size, colour, shape = words[1], words[2], words[3]
    if size not in SIZES:
        fail(f"a size in {SIZE_NAMES}")
    if colour not in COLOURS:
        fail(f"a colour in {COLOUR_NAMES}")
    if shape not in SHAPES:
        fail(f"a shape in {SHAPES}")
    rest = words[4:]
    for motion, phrase in MOTION_PHRASES.items():
        p = phrase.split()
        if rest[: len(p)] == p:
            rest = rest[len(p):]
            break
    else:
        fail(f"a motion phrase in {tuple(MOTION_PHRASES.values())}")
    if not rest or rest[0] not in SPEEDS:
        fail(f"a speed in {SPEED_NAMES}")
    del words[: len(words) - len(rest) + 1]
    return {"shape": shape, "colour": colour, "size": size, "motion": motion, "speed": rest[0]}


def parse_caption(caption: str) -> dict:
    """Inverse of ``caption_of`` for the caption-visible attributes (no jitter, angle or seed)."""
    words = caption.strip().split()
    attrs = _parse_object(words, caption)
    attrs["second"] = None
    if words and words[0] == "and":
        del words[0]
        attrs["second"] = _parse_object(words, caption)
    if len(words) < 3 or words[:2] != ["over", "a"] or words[-1] != "background":
        raise ValueError(f"cannot parse caption {caption!r}: expected 'over a <background> background' at the end")
    bg_words = words[2:-1]
    tex = "plain"
    if bg_words and bg_words[-1] in TEXTURES:
        tex = bg_words.pop()
    bg = " ".join(bg_words)
    if bg not in BACKGROUNDS:
        raise ValueError(f"cannot parse caption {caption!r}: background {bg!r} not in {BACKGROUND_NAMES}")
    attrs["background"], attrs["texture"] = bg, tex
    return attrs


# ------------------------------------------------------------------------------------------------ rendering
def _trajectory(o: dict, lane: int, T: int, H: int, W: int) -> list[tuple[float, float, float, float]]:
    """Per frame (cx, cy, radius, angle) in pixels / radians for one object."""
    r0 = SIZES[o["size"]] * (H / 32.0)
    sp = SPEEDS[o["speed"]]
    cx0 = W / 2 + o["jitter_x"]
    cy0 = H / 2 + o["jitter_y"] * (0.5 if lane else 1.0) + lane * H / 4
    step = 1.0 * sp * (W / 32.0)  # pixels per frame for translations
    span = step * (T - 1)
    out = []
    for t in range(T):
        u = t / max(T - 1, 1)
        cx, cy, r, ang = cx0, cy0, r0, o["angle0"] if o["motion"] == "rotate" else 0.0
        m = o["motion"]
        if m == "left":
            cx = cx0 + span / 2 - step * t
        elif m == "right":
            cx = cx0 - span / 2 + step * t
        elif m in ("up", "down"):  # inside a lane there is little vertical room: a third of the way
            k = 1.0 if not lane else 1.0 / 3
            sign = -1.0 if m == "up" else 1.0
            cy = cy0 - sign * k * span / 2 + sign * k * step * t
        elif m == "diagonal":  # towards the lower right
            k = 0.75 if not lane else 0.35
            cx = cx0 - k * span / 2 + k * step * t
            cy = cy0 - k * span / 2 + k * step * t
        elif m == "bounce":  # |sin| hops on a floor below the centre; faster = more hops
            amp = H / 4 if not lane else H / 8
            cy = cy0 + amp / 2 - amp * abs(math.sin(math.pi * 2.0 * sp * u))
        elif m == "grow":
            r = r0 * (0.45 + (0.35 + 0.45 * sp) * u)
        elif m == "shrink":
            r = r0 * (0.45 + (0.35 + 0.45 * sp) * (1 - u))
        elif m == "rotate":
            ang = o["angle0"] + sp * 1.6 * math.pi * u
        out.append((cx, cy, r, ang))
    return out


def _texture_field(name: str, H: int, W: int, device) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    cell = max(H // 8, 1)
    if name == "checkered":
        f = ((yy // cell + xx // cell) % 2).float()
    elif name == "striped":
        f = ((yy // cell) % 2).float()
    else:
        f = torch.full((H, W), 0.5, device=device)
    return 0.7 + 0.6 * f  # multiplies the background colour: 0.7x / 1.3x shades


@torch.no_grad()
def render(attrs_list: Sequence[dict], device="cpu", num_frames: int = NUM_FRAMES, height: int = HEIGHT,
           width: int = WIDTH) -> torch.Tensor:
    """Render clips for a list of attribute dicts: (B, T, 3, H, W) float32 in [0, 1]. Vectorised over the batch."""
    B, T, H, W = len(attrs_list), num_frames, height, width
    if B == 0:
        raise ValueError("render needs at least one attributes dict, got an empty list")
    device = torch.device(device)
    # All per-clip numbers go to the device in ONE copy (to_device: pinned, non-blocking on CUDA).
    n_layers = 2 if any(a.get("second") is not None for a in attrs_list) else 1
    empty = [(0.0, 0.0, 0.0, 0.0)] * T
    rows = []
    for a in attrs_list:
        row = list(BACKGROUNDS[a["background"]]) + [float(TEXTURES.index(a["texture"]))]
        for layer in range(n_layers):
            o = a if layer == 0 else a.get("second")
            traj = empty if o is None else _trajectory(o, a.get("lane", 0) if layer == 0 else o.get("lane", 1), T, H, W)
            row += [float(SHAPES.index(o["shape"])) if o else 0.0] + list(COLOURS[o["colour"]] if o else (0, 0, 0))
            row += [v for frame in traj for v in frame]
        rows.append(row)
    packed = to_device(torch.tensor(rows, dtype=torch.float32), device)
    bg, tex_id = packed[:, :3], packed[:, 3].long()
    tex = torch.stack([_texture_field(name, H, W, device) for name in TEXTURES])
    video = (bg[:, None, :, None, None] * tex[tex_id][:, None, None]).expand(B, T, 3, H, W).clone()

    # Up to two object layers; a missing second object gets radius 0 (and so alpha 0).
    yy, xx = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    per_layer = 4 + 4 * T
    for layer in range(n_layers):
        block = packed[:, 4 + layer * per_layer: 4 + (layer + 1) * per_layer]
        shape_id, col = block[:, 0].long(), block[:, 1:4]
        *_, alpha = shape_layer(shape_id, block[:, 4:].reshape(B, T, 4), xx, yy)
        col = col[:, None, :, None, None]
        video = video * (1 - alpha[:, :, None]) + col * alpha[:, :, None]
    return video.clamp_(0.0, 1.0)


def sample_clip(seed: int, device="cpu", second_object_prob: float = SECOND_OBJECT_PROB):
    """One clip: (video (T, 3, H, W) float32 in [0, 1], caption, attributes dict)."""
    attrs = sample_attributes(seed, second_object_prob)
    return render([attrs], device)[0], caption_of(attrs), attrs


def sample_batch(seeds: Iterable[int] | None = None, batch: int | None = None,
                 generator: torch.Generator | random.Random | None = None, device="cpu",
                 second_object_prob: float = SECOND_OBJECT_PROB):
    """A batch of clips: (videos (B, T, 3, H, W), captions list[str], attributes list[dict]).

    Give ``seeds`` (one clip per seed, same clips as ``sample_clip``), or ``batch`` and a ``generator``
    (torch.Generator or random.Random) from which the per-clip seeds are drawn."""
    attrs = [sample_attributes(s, second_object_prob) for s in draw_seeds(seeds, batch, generator)]
    return render(attrs, device), [caption_of(a) for a in attrs], attrs
