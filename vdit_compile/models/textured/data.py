"""The textured world: procedural clips whose denoising rewards *local* attention.

Why a second world: the embedded world's clips (flat shapes on flat or periodic backgrounds, 1,024 tokens)
give every token many equally good matches anywhere in the clip, so its model's attention is diffuse, while
large video DiTs attend mostly within 3D windows. Here every surface carries a texture that is unique to the
clip (random noise fields fixed by the seed, stripes or a gradient in the object's own frame) and moves with
its surface: the background drifts (a camera pan), objects translate, rotate, grow or shrink and may occlude
each other. A noisy token is best denoised from the *same* texture a few frames away, displaced by at most
~1.5 pixels per frame (< half a 4-pixel token), so the information a token needs is in a small 3D window
around it; aperiodic noise (no stripes or checkers on backgrounds) leaves no far-away duplicate to match.

Layout of a clip: float tensor (T, 3, H, W) in [0, 1], T = 16 frames of 64 x 64 RGB (pixel space, no VAE,
as the embedded world): with patch (1, 4, 4) that is 16 x 16 = 256 tokens per frame, 4,096 video tokens.

Entry points (the same as the embedded world's ``data`` module, so the scorecard and the tools take either):
``sample_attributes(seed)``, ``render(attrs_list, device)``, ``sample_clip(seed)``, ``sample_batch(...)``,
``caption_of(attrs)``, ``parse_caption(caption)``, ``VOCAB``, ``ATTRIBUTE_VALUES``.
``sample_batch(seeds=[s])[0][0]`` equals ``sample_clip(s)[0]`` on the same device.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..embedded.data import BACKGROUNDS, COLOURS
from ..procedural import SHAPES, check_seed, draw_seeds, shape_layer, to_device

NUM_FRAMES = 16
HEIGHT = 64
WIDTH = 64

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# Object surface textures, drawn in the object's own frame (they rotate and scale with it).
TEXTURES = ("striped", "spotted", "gradient")
# Background textures: both aperiodic noise (a periodic one would offer matches everywhere).
BACKGROUND_TEXTURES = ("mottled", "speckled")
SIZES = {"small": 7.0, "large": 11.0}  # object "radius" in pixels at 64 x 64
MOTIONS = ("left", "right", "up", "down", "rotate", "grow", "shrink")
MOTION_PHRASES = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                  "rotate": "rotating", "grow": "growing", "shrink": "shrinking"}
# Background drift (the camera pans the other way); "still" has no phrase in the caption.
PANS = ("still", "left", "right", "up", "down")
PAN_PHRASES = {"left": "drifting left", "right": "drifting right", "up": "drifting up", "down": "drifting down"}
SPEED = 1.25      # object translation, pixels per frame (0.31 tokens)
PAN_SPEED = 1.0   # background drift, pixels per frame
PAD = 20          # background texture margin for the drift (>= PAN_SPEED * (T - 1) + 1)
SECOND_OBJECT_PROB = 0.5

SIZE_NAMES = tuple(SIZES)
ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "size": SIZE_NAMES,
    "motion": MOTIONS,
    "texture": TEXTURES,
    "background": BACKGROUND_NAMES,
    "background_texture": BACKGROUND_TEXTURES,
    "pan": PANS,
}
#: What the scorecard's classifier checks (the primary object's shape, colour, motion and texture, and the
#: background's drift, which is only visible if the background texture is carried coherently over time).
SCORED_ATTRIBUTES = {"shape": SHAPES, "colour": COLOUR_NAMES, "motion": MOTIONS, "texture": TEXTURES, "pan": PANS}


def _vocab() -> tuple[str, ...]:
    words = ["a", "and", "over", "background"] + list(SHAPES) + list(SIZES) + list(TEXTURES) + list(BACKGROUND_TEXTURES)
    for name in COLOUR_NAMES + BACKGROUND_NAMES:
        words += name.split()
    for phrase in list(MOTION_PHRASES.values()) + list(PAN_PHRASES.values()):
        words += phrase.split()
    return tuple(dict.fromkeys(words))


VOCAB: tuple[str, ...] = _vocab()
MAX_CAPTION_WORDS = 32  # the longest caption of the grammar has 23 words


# ----------------------------------------------------------------------------------------------- attributes
def _sample_object(rng: random.Random, avoid: dict | None = None) -> dict:
    while True:
        o = {"shape": rng.choice(SHAPES), "colour": rng.choice(COLOUR_NAMES), "texture": rng.choice(TEXTURES)}
        if avoid is None or (o["shape"], o["colour"]) != (avoid["shape"], avoid["colour"]):
            break
    o.update(size=rng.choice(SIZE_NAMES), motion=rng.choice(MOTIONS),
             # not in the caption, fixed by the seed: placement jitter, start angle, texture orientation/phase
             jitter_x=rng.uniform(-6.0, 6.0), jitter_y=rng.uniform(-3.0, 3.0), angle0=rng.uniform(0.0, math.pi / 2),
             tex_angle=rng.uniform(0.0, math.pi), tex_phase=rng.uniform(0.0, 2 * math.pi),
             tex_seed=rng.randrange(2**31))
    return o


def sample_attributes(seed: int, second_object_prob: float = SECOND_OBJECT_PROB) -> dict:
    """Attributes of the clip with this seed: the primary object's keys at top level, plus background,
    background_texture, pan, bg_seed and ``second`` (the second object's dict, or None)."""
    rng = random.Random(check_seed(seed))
    attrs = _sample_object(rng)
    attrs["background"] = rng.choice(BACKGROUND_NAMES)
    attrs["background_texture"] = rng.choice(BACKGROUND_TEXTURES)
    attrs["pan"] = rng.choice(PANS)
    attrs["bg_seed"] = rng.randrange(2**31)
    second = _sample_object(rng, avoid=attrs) if rng.random() < second_object_prob else None
    attrs["second"] = second
    # Two objects: the primary is centred in the upper part, the second in the lower part; their paths overlap
    # (large objects, vertical motion), and which one is in front is fixed by the seed: occlusion.
    attrs["lane"] = -1 if second is not None else 0
    if second is not None:
        second["lane"] = 1
        attrs["second_in_front"] = rng.random() < 0.5
    attrs["seed"] = seed
    return attrs


def _object_phrase(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['texture']} {o['shape']} {MOTION_PHRASES[o['motion']]}"


def caption_of(attrs: dict) -> str:
    """e.g. 'a large red striped square moving left over a dark blue mottled background drifting up'."""
    text = _object_phrase(attrs)
    if attrs.get("second"):
        text += " and " + _object_phrase(attrs["second"])
    text += f" over a {attrs['background']} {attrs['background_texture']} background"
    if attrs["pan"] != "still":
        text += " " + PAN_PHRASES[attrs["pan"]]
    return text


def _take_phrase(words: list[str], phrases: dict) -> str | None:
    for key, phrase in phrases.items():
        p = phrase.split()
        if words[: len(p)] == p:
            del words[: len(p)]
            return key
    return None


def _parse_object(words: list[str], caption: str) -> dict:
    def fail(what: str):
        raise ValueError(f"cannot parse caption {caption!r}: expected {what}, found {' '.join(words[:5])!r}")

    if len(words) < 6 or words[0] != "a":
        fail("'a <size> <colour> <texture> <shape> <motion>'")
    size, colour, texture, shape = words[1:5]
    for value, names, what in ((size, SIZE_NAMES, "size"), (colour, COLOUR_NAMES, "colour"),
                               (texture, TEXTURES, "texture"), (shape, SHAPES, "shape")):
        if value not in names:
            fail(f"a {what} in {names}")
    del words[:5]
    motion = _take_phrase(words, MOTION_PHRASES)
    if motion is None:
        fail(f"a motion phrase in {tuple(MOTION_PHRASES.values())}")
    return {"shape": shape, "colour": colour, "texture": texture, "size": size, "motion": motion}


def parse_caption(caption: str) -> dict:
    """Inverse of ``caption_of`` for the caption-visible attributes (no jitter, angles, seeds or draw order)."""
    words = caption.strip().split()
    attrs = _parse_object(words, caption)
    attrs["second"] = None
    if words and words[0] == "and":
        del words[0]
        attrs["second"] = _parse_object(words, caption)
    if len(words) < 4 or words[:2] != ["over", "a"] or "background" not in words:
        raise ValueError(f"cannot parse caption {caption!r}: expected 'over a <colour> <texture> background "
                         f"[drifting <direction>]' at the end")
    end = words.index("background")
    bg_words, rest = words[2:end], words[end + 1:]
    if not bg_words or bg_words[-1] not in BACKGROUND_TEXTURES:
        raise ValueError(f"cannot parse caption {caption!r}: background texture must be one of {BACKGROUND_TEXTURES}")
    attrs["background_texture"] = bg_words.pop()
    attrs["background"] = " ".join(bg_words)
    if attrs["background"] not in BACKGROUNDS:
        raise ValueError(f"cannot parse caption {caption!r}: background {attrs['background']!r} not in {BACKGROUND_NAMES}")
    pan = _take_phrase(rest, PAN_PHRASES) if rest else "still"
    if pan is None or rest:
        raise ValueError(f"cannot parse caption {caption!r}: expected nothing or one of "
                         f"{tuple(PAN_PHRASES.values())} after 'background'")
    attrs["pan"] = pan
    return attrs


def canonical_attributes(caption: str, seed: int = 0) -> dict:
    """Renderable attributes for a caption: the parsed words, the seed's textures, no jitter (for real grids)."""
    a = parse_caption(caption)
    rng = random.Random(seed)
    fill = {"jitter_x": 0.0, "jitter_y": 0.0, "angle0": 0.0, "tex_angle": math.pi / 4, "tex_phase": 0.0}
    a.update(fill, tex_seed=rng.randrange(2**31), bg_seed=rng.randrange(2**31), seed=seed,
             lane=-1 if a["second"] else 0, second_in_front=False)
    if a["second"]:
        a["second"].update(fill, tex_seed=rng.randrange(2**31), lane=1)
    return a


# ------------------------------------------------------------------------------------------------ rendering
def _trajectory(o: dict, lane: int, T: int, H: int) -> list[tuple[float, float, float, float]]:
    """Per frame (cx, cy, radius, angle) in pixels / radians for one object."""
    s = H / 64.0
    r0 = SIZES[o["size"]] * s
    cx0 = H / 2 + o["jitter_x"] * s
    cy0 = H / 2 + (o["jitter_y"] + lane * 13.0) * s
    step = SPEED * s
    span = step * (T - 1)
    out = []
    for t in range(T):
        u = t / max(T - 1, 1)
        # a square at 45 degrees would be a diamond: only rotating objects start at an angle
        cx, cy, r, ang = cx0, cy0, r0, o["angle0"] if o["motion"] == "rotate" else 0.0
        m = o["motion"]
        if m in ("left", "right"):
            sign = 1.0 if m == "right" else -1.0
            cx = cx0 + sign * (step * t - span / 2)
        elif m in ("up", "down"):
            sign = 1.0 if m == "down" else -1.0
            cy = cy0 + sign * (step * t - span / 2)
        elif m == "rotate":  # 3/4 of a turn: the texture's edge moves ~2 px per frame at the rim of a large object
            ang = o["angle0"] + 1.5 * math.pi * u
        elif m == "grow":
            r = r0 * (0.5 + 0.6 * u)
        elif m == "shrink":
            r = r0 * (1.1 - 0.6 * u)
        out.append((cx, cy, r, ang))
    return out


def _noise_grids(seed: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randn(n, n, generator=g) for n in sizes]


# Noise octaves (grid sizes over the padded background, weights): mottled is smooth, speckled is fine grained.
_BG_OCTAVES = {"mottled": ((6, 1.0), (12, 0.5), (26, 0.25)), "speckled": ((26, 0.6), (52, 1.0))}
_OBJ_GRID = 9  # spotted texture: noise grid over the object's [-1.3 r0, 1.3 r0] square


def _noise_field(grids: Sequence[torch.Tensor], weights: Sequence[float], size: int) -> torch.Tensor:
    """(B, n, n) grids per octave -> (B, size, size) in [0, 1], bicubic upsampled, unit-std before squashing."""
    acc = None
    for g, w in zip(grids, weights):
        up = F.interpolate(g[:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0] * w
        acc = up if acc is None else acc + up
    acc = acc / acc.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None]
    return (0.5 + 0.22 * acc).clamp(0.0, 1.0)


@torch.no_grad()
def render(attrs_list: Sequence[dict], device="cpu", num_frames: int = NUM_FRAMES, height: int = HEIGHT,
           width: int = WIDTH) -> torch.Tensor:
    """Render clips for a list of attribute dicts: (B, T, 3, H, W) float32 in [0, 1]. Vectorised over the batch."""
    B, T, H, W = len(attrs_list), num_frames, height, width
    if B == 0:
        raise ValueError("render needs at least one attributes dict, got an empty list")
    if H != W:
        raise ValueError(f"the textured world renders square frames, got height {H} != width {W}")
    device = torch.device(device)
    s = H / 64.0
    # -- per-clip numbers and noise grids, packed on the host and sent in one (pinned) copy per tensor
    n_layers = 2 if any(a.get("second") is not None for a in attrs_list) else 1
    rows, bg_grids, obj_grids = [], {k: [] for k in BACKGROUND_TEXTURES}, []
    bg_kind = []
    for a in attrs_list:
        bg_kind.append(BACKGROUND_TEXTURES.index(a["background_texture"]))
        for kind, octaves in _BG_OCTAVES.items():  # both kinds per clip keeps shapes uniform; one is used
            grids = _noise_grids(a["bg_seed"] + (0 if kind == "mottled" else 7919), [n for n, _ in octaves])
            bg_grids[kind].append(grids)
        pan = a["pan"]
        dx = {"left": -1.0, "right": 1.0}.get(pan, 0.0) * PAN_SPEED
        dy = {"up": -1.0, "down": 1.0}.get(pan, 0.0) * PAN_SPEED
        row = list(BACKGROUNDS[a["background"]]) + [dx, dy]
        layers = [a, a.get("second")]
        if a.get("second") is not None and a.get("second_in_front"):
            layers = layers[::-1]
        layers = layers[:n_layers]
        per_obj = []
        for o in layers:
            if o is None:
                row += [0.0] * (8 + 4 * T)
                per_obj.append(torch.zeros(_OBJ_GRID, _OBJ_GRID))
                continue
            traj = _trajectory(o, o.get("lane", 0), T, H)
            row += [float(SHAPES.index(o["shape"]))] + list(COLOURS[o["colour"]]) + [
                float(TEXTURES.index(o["texture"])), o["tex_angle"], o["tex_phase"], SIZES[o["size"]] * s]
            row += [v for frame in traj for v in frame]
            per_obj.append(_noise_grids(o["tex_seed"], [_OBJ_GRID])[0])
        obj_grids.append(torch.stack(per_obj))
        rows.append(row)

    packed = to_device(torch.tensor(rows, dtype=torch.float32), device)
    kind = to_device(torch.tensor(bg_kind), device)
    obj_noise = to_device(torch.stack(obj_grids), device)  # (B, n_layers, n, n)

    # -- background: a noise field over the padded square, sampled at the drifting window
    S = H + 2 * math.ceil(PAD * s)
    field = None
    for k, (name, octaves) in enumerate(_BG_OCTAVES.items()):
        grids = [to_device(torch.stack([clip[i] for clip in bg_grids[name]]), device) for i in range(len(octaves))]
        f = _noise_field(grids, [w for _, w in octaves], S)
        field = f if field is None else torch.where((kind == k)[:, None, None], f, field)
    bg_col = packed[:, 0:3]
    drift = packed[:, 3:5] * s  # pixels per frame
    t = torch.arange(T, device=device, dtype=torch.float32)
    pix = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    # content drifting right by d px: frame pixel x shows field x - d * t (centred so the window stays inside)
    off = drift[:, None, :] * (t[None, :, None] - (T - 1) / 2)  # (B, T, 2)
    gx = (pix[None, None, None, :] - off[..., 0, None, None] + (S - H) / 2) / S * 2 - 1  # (B, T, 1, W)
    gy = (pix[None, None, :, None] - off[..., 1, None, None] + (S - H) / 2) / S * 2 - 1  # (B, T, H, 1)
    grid = torch.stack([gx.expand(B, T, H, W), gy.expand(B, T, H, W)], dim=-1).reshape(B * T, H, W, 2)
    fb = F.grid_sample(field[:, None].repeat_interleave(T, 0), grid, mode="bilinear", padding_mode="border",
                       align_corners=False).reshape(B, T, 1, H, W)
    video = bg_col[:, None, :, None, None] * (0.45 + 1.1 * fb) + 0.22 * (fb - 0.25)

    # -- objects: signed distance for the outline, texture in the object's frame (rotates and scales with it)
    yy, xx = torch.meshgrid(pix, pix, indexing="ij")
    per_layer = 8 + 4 * T
    for layer in range(n_layers):
        block = packed[:, 5 + layer * per_layer: 5 + (layer + 1) * per_layer]
        shape_id, col, tex_id = block[:, 0].long(), block[:, 1:4], block[:, 4].long()
        tex_ang, tex_phase, r_base = block[:, 5], block[:, 6], block[:, 7]
        px, py, r, alpha = shape_layer(shape_id, block[:, 8:].reshape(B, T, 4), xx, yy)
        # object-frame coordinates in units of the base radius (texture scales with grow / shrink)
        u, v = px / r.clamp_min(1e-3), py / r.clamp_min(1e-3)
        ta = tex_ang[:, None, None, None]
        along = u * torch.cos(ta) + v * torch.sin(ta)
        period = 5.0 * s  # pixels: stripes finer than a 4-pixel token
        striped = 0.5 + 0.5 * torch.tanh(2.5 * torch.sin(along * r_base[:, None, None, None] * (2 * math.pi / period)
                                                         + tex_phase[:, None, None, None]))
        gradient = (0.5 + 0.5 * along).clamp(0.0, 1.0)
        ogrid = torch.stack([u / 1.3, v / 1.3], dim=-1).reshape(B * T, H, W, 2)
        onoise = obj_noise[:, layer][:, None].repeat_interleave(T, 0)
        z = F.grid_sample(onoise, ogrid, mode="bicubic", padding_mode="border", align_corners=False).reshape(B, T, H, W)
        spotted = 0.5 + 0.5 * torch.tanh(2.5 * z)
        tid = tex_id[:, None, None, None]
        f = torch.where(tid == 0, striped, torch.where(tid == 1, spotted, gradient))
        # the dark phase stays at 45 % of the colour: a small striped object on a dark background keeps its outline
        obj = col[:, None, :, None, None] * (0.45 + 0.55 * f[:, :, None])
        a_ = alpha[:, :, None]
        video = video * (1 - a_) + obj * a_
    return video.clamp_(0.0, 1.0)


def sample_clip(seed: int, device="cpu", second_object_prob: float = SECOND_OBJECT_PROB):
    """One clip: (video (T, 3, H, W) float32 in [0, 1], caption, attributes dict)."""
    attrs = sample_attributes(seed, second_object_prob)
    return render([attrs], device)[0], caption_of(attrs), attrs


def sample_batch(seeds: Iterable[int] | None = None, batch: int | None = None,
                 generator: torch.Generator | random.Random | None = None, device="cpu",
                 second_object_prob: float = SECOND_OBJECT_PROB):
    """A batch of clips: (videos (B, T, 3, H, W), captions, attributes); ``seeds`` or ``batch`` + ``generator``."""
    attrs = [sample_attributes(s, second_object_prob) for s in draw_seeds(seeds, batch, generator)]
    return render(attrs, device), [caption_of(a) for a in attrs], attrs


# Prompts of the training run's sample grid (tools/train_reference.py --world textured) and the model card.
GRID_PROMPTS = [
    "a large red striped square moving right over a dark blue mottled background",
    "a large green spotted circle moving left over a gray speckled background drifting up",
    "a large blue gradient triangle moving up over a black mottled background drifting right",
    "a large yellow striped diamond moving down over a dark green speckled background",
    "a large cyan spotted cross rotating over a dark red mottled background drifting left",
    "a large magenta striped circle rotating over a dark blue speckled background",
    "a small red gradient square growing over a gray mottled background drifting down",
    "a large yellow spotted triangle shrinking over a dark green mottled background",
    "a small green striped diamond moving right over a black speckled background drifting left",
    "a large blue spotted square moving left over a dark red speckled background drifting right",
    "a large cyan gradient circle moving down over a dark blue mottled background drifting up",
    ("a large magenta spotted triangle moving up and a small yellow striped square moving right "
     "over a black mottled background"),
]
