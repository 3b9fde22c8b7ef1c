"""Token-order probe: check, by running the graph, that video tokens really are frame-major.

Shapes and the sequence ``cat`` say *how many* tokens are video and where the text sits; they
do not prove the video tokens are ordered frame by frame, nor (when channels and frames have
the same size, or conditioning channels are concatenated to the latents) which input axis holds
the frames.  Where the graph holds the video input, the probe runs the graph up to ``q`` of the
first tileable site (an :class:`torch.fx.Interpreter` that stops there), once as is and once
per latent input frame with that frame perturbed, and compares the per-token change of ``q``:

* *exact*: when no op before the site mixes tokens (patch embedding, norms, projections), the
  perturbation of latent frame ``f`` changes exactly the ``P`` tokens of token frame
  ``f // patch_t`` at ``text_prefix + (f // patch_t) * P``;
* *strongest response*: when blocks before the first softmax attention mix tokens (linear
  attention, temporal convolutions), every token may change, but each video token still
  responds most to its own frame (the residual path carries it): with a small perturbation (the
  linear response), every video token's response to its frame-major frame must exceed its
  response to any other frame, by :data:`DOMINANCE` times in the median.
  Tokens in another order (H, W, T), or a wrong frame axis (a channel perturbed as if it were a
  frame), fail this test at almost every token.

If neither holds, the interpretation is rejected with the probe's finding.  Sites whose text
length is symbolic (trimmed by value) are probed the same way: the graph runs on the call's
real inputs, so the text length of this call is known and the video block's position is
checked too.

:func:`select_grid` runs detection once per interpretation of the call's video input
(:func:`.grid.grid_candidates`) and keeps the first the probe confirms; when none is, the
sites stay dense and the reason lists every interpretation tried and why it was rejected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.fx

from .attention import example_shape
from .grid import GridInfo, grid_candidates
from .split import static_int

#: mixed video tokens must respond (median, in energy) this many times more to their own frame than to any other
DOMINANCE = 4.0
_CONFIRMED = "token order confirmed by probe"


@dataclass(frozen=True)
class ProbeResult:
    """``ok``: True confirmed, False rejected, None the probe cannot run on this graph; ``detail`` says more."""

    ok: bool | None
    detail: str = ""
    mixed: bool = False  # confirmed by the strongest response (tokens mixed before the site)
    order: str = ""  # "HWT" when the tokens were confirmed frame-minor (the op reorders them; see layout.py)


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


class _UpTo(torch.fx.Interpreter):
    def __init__(self, gm, target):
        super().__init__(gm)
        self.target = target

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.target:
            raise _Stop(out)
        return out


def _run_to(gm, target, inputs):
    try:
        _UpTo(gm, target).run(*inputs)
    except _Stop as s:
        return s.value
    raise RuntimeError("probe target was never reached")


def _video_placeholder(example_inputs, video) -> int | None:
    """Index of the graph input that is the call's video tensor (Dynamo passes the real inputs)."""
    for i, x in enumerate(example_inputs):
        if x is video:
            return i
    return None


def _real(inputs) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(isinstance(x, FakeTensor) for x in inputs)


def _shown(tokens: list) -> list:
    return tokens if len(tokens) <= 8 else tokens[:4] + ["..."] + tokens[-2:]


def _dominance(energy: torch.Tensor, pre: int, P: int, T: int) -> tuple[str, float]:
    """``("", median ratio)`` when every video token responds most to its own frame, else what is wrong.

    ``energy[tf, n]``: squared change of token ``n`` when token frame ``tf``'s latent frames are perturbed.
    Every token's own-frame energy must exceed its largest other-frame energy, and the median over the
    video tokens of that ratio must reach :data:`DOMINANCE` (one random draw per frame: a single token may
    come close, the bulk may not).
    """
    n = T * P
    video = energy[:, pre:pre + n]  # (T, N)
    own, idx = torch.arange(n) // P, torch.arange(n)
    mine = video[own, idx]
    others = video.clone()
    others[own, idx] = -1.0
    best_other, best_frame = others.max(dim=0)
    ratio = mine / best_other.clamp_min(1e-30)
    median = float(ratio.median())
    bad = (ratio <= 1.0).nonzero().flatten().tolist()
    if bad:
        k = bad[0]
        return (f"token {pre + k} responds most to frame {int(best_frame[k])}, not to its frame-major frame "
                f"{int(own[k])} ({len(bad)} of {n} video tokens respond most to another frame)"), median
    if median < DOMINANCE:
        return (f"video tokens respond to their own frame only {median:.3g} times more than to another (median "
                f"energy ratio, {DOMINANCE:g} needed)"), median
    return "", median


def _check_order(run, x: torch.Tensor, grid: GridInfo, layout) -> ProbeResult:
    """The exact and strongest-response tests (module docstring) on ``run(video) -> tokens (..., L, D)``.

    The runs leave the global RNG as they found it (a model in training mode draws dropout masks)."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return _check_order_runs(run, x, grid, layout)


def _check_order_runs(run, x: torch.Tensor, grid: GridInfo, layout) -> ProbeResult:
    src = grid.axes
    base = run(x).float()
    lay = layout.resolve(base.shape[-2]) if layout.is_dynamic else layout  # text trimmed by value: this call's
    P, pre, T = lay.frame_tokens, lay.text_prefix, lay.num_frames
    if src == "BNC":
        frames, per, axis = T, P, None
    else:
        axis = src.index("T")
        frames, per = x.shape[axis], None
    patch_t = max(1, frames // T) if per is None else 1

    def perturbed(f: int, gen: torch.Generator, scale: float) -> torch.Tensor:
        """The tokens' change with latent frame ``f`` perturbed by ``scale`` x Gaussian noise."""
        xp = x.clone()
        sl = [slice(None)] * x.dim()
        if per is None:
            sl[axis] = f
        else:
            sl[1] = slice(f * per, (f + 1) * per)
        xp[tuple(sl)] += scale * torch.randn(xp[tuple(sl)].shape, generator=gen).to(xp)
        return run(xp).float() - base

    tok = base.dim() - 2
    others = tuple(d for d in range(base.dim()) if d != tok)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tol = 1e-6 * (1 + base.abs().max())
    first_miss = ""
    minor = frames > 1 and lay.order != "TWH"  # frame-minor (H, W, T) tokens, until a frame says otherwise
    for f in range(frames):  # exact: a unit perturbation changes exactly the frame's token block
        changed = (perturbed(f, gen, 1.0).abs().amax(dim=others) > tol).nonzero().flatten().tolist()
        tf = f // patch_t
        minor = minor and changed == [pre + p * T + tf for p in range(P)]
        if minor:
            continue
        want = list(range(pre + tf * P, pre + (tf + 1) * P))
        if f and changed != want and all(
                (perturbed(g, gen, 1.0).abs().amax(dim=others) > tol).nonzero().flatten().tolist()
                == [pre + p * T + g // patch_t for p in range(P)] for g in range(f)):
            first_miss = f"frames 0..{f - 1} changed frame-minor token sets, frame {f} did not"
        if changed != want:
            first_miss = (f"perturbing latent frame {f} changed tokens {_shown(changed)}, expected the frame-major "
                          f"block {want[0]}..{want[-1]}")
            if not set(want) <= set(changed):  # its own block unchanged: no mixing explains that
                return ProbeResult(False, f"token-order probe: {first_miss}; video tokens are not frame-major here")
            break
    if minor:
        return ProbeResult(True, "frame-minor tokens (H, W, T): each latent frame changes every T-th token", order="HWT")
    if not first_miss:
        return ProbeResult(True)
    # tokens mixed before the site: a small perturbation (the linear response, no saturating norm) per frame
    scale = (0.02 if x.dtype in (torch.float32, torch.float64) else 0.2) * float(x.float().std().clamp_min(1e-6))
    energy = torch.zeros(T, base.shape[-2], dtype=torch.float64)
    for f in range(frames):
        energy[f // patch_t] += perturbed(f, gen, scale).double().pow(2).sum(dim=others).cpu()
    why, ratio = _dominance(energy, pre, P, T)
    if why:
        return ProbeResult(False, f"token-order probe: {first_miss}, and token mixing before the attention does not "
                                  f"explain it: {why}; video tokens are not frame-major here")
    return ProbeResult(True, f"tokens mixed before the attention; every video token responds most to its own frame "
                             f"(median energy ratio {ratio:.3g})", mixed=True)


def _probed_layout(src: str) -> bool:
    return src == "BNC" or "T" in src and "C" in src


@torch.no_grad()
def probe_order(gm: torch.fx.GraphModule, example_inputs, template, grid: GridInfo) -> ProbeResult:
    """Run the graph up to the site's ``q`` with each latent frame perturbed (module docstring)."""
    idx = _video_placeholder(example_inputs, grid.tensor)
    if idx is None:
        return ProbeResult(None, "the graph does not take the video input")
    if not _real(example_inputs):
        return ProbeResult(None, "the graph's inputs are fake tensors")
    if not _probed_layout(grid.axes):
        return ProbeResult(None, f"layout {grid.axes} is not probed")
    inputs = list(example_inputs)

    def run(video):
        inputs[idx] = video
        return _run_to(gm, template.match.q, inputs)

    return _check_order(run, inputs[idx], grid, template.site.layout)


def _replace(value, old, new):
    """``value`` (nested lists / tuples / dicts) with the tensor ``old`` swapped for ``new``."""
    if value is old:
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


@torch.no_grad()
def probe_eager(root: torch.nn.Module, call: tuple, template, grid: GridInfo) -> ProbeResult:
    """The probe for a graph that does not hold the video input (a block's graph after a graph break): run the
    model's own (uncompiled) forward, stopped at the site's module, and test the token sequence entering it
    (queries are a token-wise projection of it in the blocks this serves)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(grid.tensor, torch.Tensor) or isinstance(grid.tensor, FakeTensor):
        return ProbeResult(None, "no real video input")
    if not _probed_layout(grid.axes):
        return ProbeResult(None, f"layout {grid.axes} is not probed")
    lay = template.site.layout
    try:
        module = root.get_submodule(template.site.name.split("#")[0])
    except AttributeError:
        return ProbeResult(None, f"module {template.site.name} not found in the model")
    lengths = {lay.video_tokens} if lay.is_dynamic else {lay.seq_len, lay.video_tokens}
    args, kwargs = call

    def grab(_mod, a, kw):
        tensors = [t for t in (*a, *kw.values()) if isinstance(t, torch.Tensor) and t.dim() >= 3]
        for want in sorted(lengths, reverse=True):  # the joint sequence if the block gets it, else the video
            for t in tensors:
                if t.shape[-2] == want:
                    raise _Stop(t if want == lay.seq_len or lay.is_dynamic else ("video", t))
        raise _Stop(None)

    def run(video):
        handle = module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            type(root).forward(root, *_replace(args, grid.tensor, video), **_replace(kwargs, grid.tensor, video))
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
        return None

    try:
        first = run(grid.tensor)
        if first is None:
            return ProbeResult(None, f"no input of {template.site.name} holds its {sorted(lengths)} tokens")
        if isinstance(first, tuple):  # the module takes the video tokens alone (text joined inside)
            lay = type(lay)(lay.num_frames, lay.height, lay.width, 0, 0, lay.order)
            return _check_order(lambda v: run(v)[1], grid.tensor, grid, lay)
        return _check_order(run, grid.tensor, grid, lay)
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward means "not confirmed", never wrong
        return ProbeResult(None, f"running the model to probe failed: {type(exc).__name__}: {exc}")


def probe_layout(gm: torch.fx.GraphModule, example_inputs, template, grid) -> str | None:
    """``""`` if the token order is confirmed, ``None`` if it cannot be probed here, else what is wrong."""
    res = probe_order(gm, example_inputs, template, grid)
    return "" if res.ok else None if res.ok is None else res.detail


def _packed(templates, grid: GridInfo) -> list:
    """``[(template, why)]`` for sites whose sequence holds every video of a list packed together (a tile mask
    covers one frame-major grid per sequence: several videos in one sequence cannot be tiled)."""
    if len(grid.group) < 2 or not isinstance(grid.tensor, torch.Tensor):
        return []
    numel = grid.tensor.numel()
    counts = [grid.video_tokens * math.prod(shape) // numel for shape in grid.group]  # same channels and patch
    out = []
    for t in templates:
        qs = example_shape(t.match.q)
        n = static_int(qs[-2]) if qs is not None and len(qs) >= 3 else None
        if n is not None and n >= sum(counts):
            why = (f"{grid.key.rsplit('[', 1)[0]} holds {len(grid.group)} videos {list(grid.group)} and this "
                   f"attention runs over {n} tokens, their {'+'.join(map(str, counts))} video tokens packed into "
                   f"one sequence: a tile mask covers one frame-major grid per sequence, so a packed sequence of "
                   f"several videos cannot be tiled")
            out.append((t, why))
    return out


def _confirmed_before(state) -> dict:
    """Interpretations the probe confirmed on earlier graphs of this model (a graph after a graph break
    does not hold the video input): ``{(argument, shape): axes}``, kept on the model's state."""
    memo = getattr(state, "probe_confirmed_grids", None)
    if memo is None:
        memo = {}
        try:
            state.probe_confirmed_grids = memo
        except AttributeError:
            pass
    return memo


def _judge(gm, ctx, first, grid: GridInfo, memo: dict, probe_on: bool) -> tuple[ProbeResult, str | None]:
    """``(result, note)`` for one interpretation: ``result.ok`` True means use it (``note`` goes on its sites).

    The graph probe first; a graph without the video input trusts a ``certain`` interpretation (as before
    interpretations were tried), reuses a confirmation from an earlier graph, or runs the model eagerly.
    """
    key = (grid.key, tuple(grid.tensor.shape) if isinstance(grid.tensor, torch.Tensor) else ())
    what = "" if grid.certain else grid.describe()
    res = probe_order(gm, ctx.example_inputs, first, grid) if probe_on or not grid.certain \
        else ProbeResult(None, "probe off")
    if res.ok is None and grid.certain:
        return ProbeResult(True), None
    if res.ok is None and memo.get(key, (None, ""))[0] == grid.axes:
        return ProbeResult(True, order=memo[key][1]), f"{_CONFIRMED} on an earlier graph ({what})"
    if res.ok is None and probe_on:  # no video input in this graph: run the model itself up to the site
        eager = probe_eager(ctx.state.root, ctx.state.call, first, grid)
        if eager.ok is None:
            return ProbeResult(None, f"{res.detail}; {eager.detail}"), None
        res = ProbeResult(eager.ok, "; ".join(x for x in ("eager model run", eager.detail) if x), eager.mixed,
                          eager.order)
    if not res.ok:
        return res, None
    memo[key] = (grid.axes, res.order)
    extra = [x for x in (what, res.detail) if x]
    return res, _CONFIRMED + (f" ({'; '.join(extra)})" if extra else "")


def select_grid(gm: torch.fx.GraphModule, ctx, detect_sites) -> tuple[list, GridInfo | None, str]:
    """``(templates, grid, reason)``: detection under the first interpretation of the video input that holds.

    ``detect_sites(gm, example_inputs, grid, grid_reason, root_names)`` is :func:`.detect.detect_sites`.  A
    ``certain`` interpretation (:mod:`.grid`) is used unless the probe rejects it; any other needs the probe's
    confirmation, here or on an earlier graph of the model.  An interpretation whose token count matches no
    attention site is skipped.  None confirmed: every 3D site stays dense with the list of what was tried.
    """
    args, kwargs = ctx.state.call
    cands, why = grid_candidates(ctx.state.root, args, kwargs)
    probe_on = getattr(ctx.config, "probe", True)
    memo = _confirmed_before(ctx.state)
    tried, fallback = [], None
    for grid in cands:
        templates = detect_sites(gm, ctx.example_inputs, grid, "", ctx.root_names)
        tile = [t for t in templates if t.site.tileable]
        if not tile:
            if grid.certain:  # this graph has no 3D attention (a text refiner, cross-attention only ...)
                for t, packed in _packed(templates, grid):
                    t.site.reason = f"{t.site.reason}; {packed}" if t.site.reason else packed
                return templates, grid, ""
            tried.append(f"{grid.describe()}: no attention site holds its {grid.video_tokens} video tokens")
            tried += [p for p in dict.fromkeys(w for _, w in _packed(templates, grid)) if p not in tried]
            continue
        first = tile[0]
        res, note = _judge(gm, ctx, first, grid, memo, probe_on)
        if res.ok:
            layout = first.site.layout
            for t in tile:
                if t.site.layout == layout:
                    if note:
                        t.notes.append(note)
                    if res.order == "HWT":  # confirmed frame-minor: the op reorders these tokens into frames
                        t.site.layout = replace(layout, order="HWT")
            return templates, grid, ""
        if res.ok is None:
            tried.append(f"{grid.guessed or grid.describe()}, and the token-order probe could not run to confirm it "
                         f"({res.detail})")
        else:
            tried.append(f"{grid.describe()}: {res.detail}" if len(cands) > 1 else res.detail)
        fallback = fallback or templates
    if len(tried) == 1:
        reason = tried[0]
    elif tried:
        reason = f"no interpretation of the video input was confirmed ({len(tried)} tried): " + " | ".join(tried)
    else:
        reason = why
    if fallback is None:
        return detect_sites(gm, ctx.example_inputs, None, reason, ctx.root_names), None, reason
    for t in fallback:
        if t.site.tileable:
            t.site.layout, t.site.reason = None, reason
    return fallback, None, reason
