"""Does a rewrite pay on the device it runs on?  Time dense SDPA against the tile op, once per shape class.

Why: a mask that saves attention work only saves time where the sparse op is faster than the
dense SDPA it replaces at that sequence length and density.  On a small CPU model (the demo's
1024-token embedded model) a rewritten site can be slower than dense, so the rewrite must be
decided per device, by measurement.

:func:`should_rewrite` answers ``(rewrite?, reason)`` for one site.  Modes
(``OptimizeConfig.cost_model``):

* ``"auto"`` (default): measure on CPU; on CUDA rewrite (the Triton kernel's own benchmarks,
  BENCHMARKS.md, decide there, and a measurement would compile kernels at rewrite time).  Sites
  whose dense attention is tiny (under :data:`MIN_MEASURED_FLOPS` per call and batch row) are
  rewritten without measuring: their time is below timer noise whichever way it goes.
* ``"measure"``: measure on every device, tiny sites included.
* ``"always"``: rewrite every tileable site the plan tiles (the behaviour before the cost model;
  what export checks and kernel tests need).

A measurement times dense SDPA and the tile op's forward, interleaved, on random inputs of the site's
shape (batch 1, the site's layout, heads and head dim) and compares their minima; the op must be at least
:data:`MARGIN` times as fast.  The op runs **the site's own masks on its own token tiles** when the caller
gives them (``should_rewrite(..., tile=, masks=)``, what ``optimize`` does): the op's cost depends on the
mask family and the unit size, not on the density alone (2026-12-07, embedded model, CPU: a site of 3D
windows on 4 x 4-token tiles at density 0.65 was timed x1.37 by a band of whole frames at that density, and
is x0.88 with its own masks).  Without masks, a band mask of whole frames keeping the given density is the proxy.
Forward only: inference is what the rewrite serves by default (training users who want the
sparse backward anyway set ``"always"``).  Results live in a :class:`CostModel` (a bounded LRU);
:data:`DEFAULT_COST_MODEL` is the per-process one that :func:`should_rewrite` uses unless given
another: timings are a property of the device, not of one model, so models share them.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import TokenLayout

MODES = ("auto", "measure", "always")

#: Dense attention work (``4 * H * L^2 * D`` flops per batch row) below which ``"auto"`` does not measure.
MIN_MEASURED_FLOPS = 5e7

#: The sparse op must take at most this fraction of dense SDPA's time to be used (noise margin).
MARGIN = 0.9


@dataclass(frozen=True)
class ShapeClass:
    """What a timing depends on: device, dtype, layout, heads, head dim and kept frames per query frame."""

    device: str
    dtype: str
    num_frames: int
    frame_tokens: int
    text_prefix: int
    text_suffix: int
    heads: int
    head_dim: int
    kept_frames: int
    grid: tuple = ()  # the op's grid argument [T, H, W, tile_h, tile_w(, 1)] of the site's own masks (): proxy band
    masks: str = ""  # the op's masks argument (one name per head, or one for all); "" with grid ()

    def describe(self) -> str:
        L = self.text_prefix + self.num_frames * self.frame_tokens + self.text_suffix
        what = (f"{self.kept_frames}/{self.num_frames} frames kept" if not self.masks else
                f"its {len(set(self.masks.split(',')))} distinct head mask(s) on {self.grid[3]}x{self.grid[4]}-token tiles")
        return (f"{self.device} {self.dtype} L={L} ({self.num_frames}x{self.frame_tokens}"
                f"{f' + {self.text_prefix + self.text_suffix} text' if self.text_prefix + self.text_suffix else ''}) "
                f"{self.heads}x{self.head_dim} heads, {what}")


@dataclass(frozen=True)
class Timing:
    dense_s: float
    sparse_s: float

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else math.inf


def proxy_frame_mask(num_frames: int, kept: int) -> torch.Tensor:
    """``(1, T, T)`` band mask: each query frame keeps ``kept`` consecutive frames around itself
    (shifted at the clip's ends so every row keeps exactly ``kept``): a mask of exact density."""
    T, kept = num_frames, max(1, min(kept, num_frames))
    start = (torch.arange(T) - (kept - 1) // 2).clamp(0, T - kept)
    f = torch.arange(T)
    return ((f[None, :] >= start[:, None]) & (f[None, :] < start[:, None] + kept))[None]


def kept_frames_for(layout: TokenLayout, density: float) -> int:
    """Kept frames per query frame of a band mask whose density (text counted) is ``density``."""
    L, n, V = layout.seq_len, layout.text_prefix + layout.text_suffix, layout.video_tokens
    text_part = 2 * n * L - n * n
    video_density = (density * L * L - text_part) / (V * V) if V else 1.0
    return max(1, min(layout.num_frames, round(video_density * layout.num_frames)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_min(fns, device, min_reps: int = 5, max_reps: int = 15, budget_s: float = 3.0) -> list[float]:
    """Minimum time of each function, run interleaved (load changes hit both alike); one warm-up each."""
    for f in fns:
        f()
    _sync(device)
    best = [math.inf] * len(fns)
    t_end = time.perf_counter() + budget_s
    for rep in range(max_reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
        if rep + 1 >= min_reps and time.perf_counter() > t_end:
            break
    return best


def time_shape_class(sc: ShapeClass) -> Timing:
    """Dense SDPA vs the tile op's forward on the proxy of ``sc`` (see module doc).

    Runs on real tensors even when called from inside a compile backend (any active fake mode is
    suspended: the decision is made while the rewrite pass runs).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _time_shape_class(sc)


def _time_shape_class(sc: ShapeClass) -> Timing:
    device, dtype = torch.device(sc.device), getattr(torch, sc.dtype)
    layout = TokenLayout(sc.num_frames, sc.frame_tokens, 1, sc.text_prefix, sc.text_suffix)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, sc.heads, layout.seq_len, sc.head_dim, generator=gen).to(device, dtype) for _ in range(3))
    scale = sc.head_dim ** -0.5

    def dense():
        F.scaled_dot_product_attention(q, k, v, scale=scale)

    if sc.masks or device.type != "cpu":  # through the op: the site's own masks, else a frame window of the band's width
        from ..ops import tile_attention  # noqa: F401  (registers torch.ops.vdit.tile_attention)

        grid, masks = (([int(x) for x in sc.grid], sc.masks) if sc.masks else
                       ([sc.num_frames, sc.frame_tokens, 1, sc.frame_tokens, 1], f"g0w{(sc.kept_frames - 1) // 2}"))

        def sparse():
            torch.ops.vdit.tile_attention(q, k, v, sc.text_prefix, sc.text_suffix, grid, masks, scale)
    else:  # the op's CPU path, on the exact band
        from ..ops.cpu_fast import fast_attention

        fmask = proxy_frame_mask(sc.num_frames, sc.kept_frames)

        def sparse():
            fast_attention(q, k, v, layout, fmask, scale)

    with torch.no_grad():
        td, ts = _interleaved_min([dense, sparse], device)
    return Timing(td, ts)


class CostModel:
    """Bounded LRU of :class:`Timing` per :class:`ShapeClass` (thread-safe; ``maxsize`` entries)."""

    def __init__(self, maxsize: int = 128):
        self.maxsize = maxsize
        self._cache: OrderedDict[ShapeClass, Timing] = OrderedDict()
        self._lock = threading.Lock()

    def timing(self, sc: ShapeClass) -> Timing:
        with self._lock:
            if sc in self._cache:
                self._cache.move_to_end(sc)
                return self._cache[sc]
        t = time_shape_class(sc)
        with self._lock:
            self._cache[sc] = t
            while len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)
        return t

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


#: The per-process cost model (timings are a property of the device; see module doc).
DEFAULT_COST_MODEL = CostModel()


def should_rewrite(device, dtype, layout: TokenLayout, density: float, heads: int, head_dim: int, config,
                   cost_model: CostModel | None = None, tile=None, masks=None) -> tuple[bool, str]:
    """``(rewrite?, reason)`` for a site with this layout, mean mask density, heads and head dim.

    ``config`` is an ``OptimizeConfig`` (its ``cost_model`` mode; a missing attribute means ``"auto"``).
    ``masks`` (one per head) and ``tile`` (``(tile_h, tile_w)``, ``None``: whole frames): time the op with the
    site's own masks (module doc); without them, a band of whole frames at ``density``.
    """
    mode = getattr(config, "cost_model", "auto")
    if mode not in MODES:
        raise ValueError(f"cost_model must be one of {MODES}, found {mode!r}")
    device = torch.device(device)
    if mode == "always":
        return True, "cost model off (cost_model='always')"
    if layout.is_dynamic:
        return True, "text length varies per call: not measured, rewritten"
    if mode == "auto" and device.type != "cpu":
        return True, f"cost_model='auto' trusts the tile kernel on {device.type} (cost_model='measure' times it)"
    flops = 4 * heads * layout.seq_len ** 2 * head_dim
    if mode == "auto" and flops < MIN_MEASURED_FLOPS:
        return True, f"attention too small to matter ({flops / 1e6:.1f} MFLOP per call): not measured, rewritten"
    if str(device) == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return True, f"no fast CPU op for {dtype}: not measured, rewritten"
    own = {}
    if masks is not None:
        from ..ops.args import encode_masks, op_grid

        own = {"grid": tuple(op_grid(layout, tile)), "masks": encode_masks(masks)}
    sc = ShapeClass(str(device), str(dtype).removeprefix("torch."), layout.num_frames, layout.frame_tokens,
                    layout.text_prefix, layout.text_suffix, heads, head_dim, kept_frames_for(layout, density), **own)
    t = (cost_model if cost_model is not None else DEFAULT_COST_MODEL).timing(sc)
    verdict = (f"tile op {t.sparse_s * 1e3:.2f} ms vs dense SDPA {t.dense_s * 1e3:.2f} ms (x{t.speedup:.2f}) "
               f"on {sc.describe()}")
    if t.sparse_s <= MARGIN * t.dense_s:
        return True, "pays: " + verdict
    return False, f"left dense by the cost model: {verdict}; needs x{1 / MARGIN:.2f}"
