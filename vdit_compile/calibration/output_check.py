"""Check a calibrated plan against the whole output, and give heads back to dense attention until it holds.

Why: calibration bounds each head's attention error on its own (``error_budget``), but a sample is made by
every head of every layer over every denoising step, and their errors compound.  Measured on the textured
world (docs/textured/MODEL_CARD.md, 2026-12-07): the default plan's seven sparse heads each alone cost
34.7-46.2 dB of PSNR against the dense sample, all seven together 26.6 dB.  A per-head budget tight enough for
every model would leave most heads dense on all of them; the output check instead runs the calibration
samples again under the plan and compares them with the dense ones.

What it does (``OptimizeConfig.output_psnr``): the sparse heads of the sites that will run sparse are ordered
by calibrated error per density saved, worst first; if the plan misses the target, a bisection finds the
fewest of them (a prefix of that order) whose return to dense attention meets it.  Each trial is one run of
the calibration prompts (or, for a bare transformer, its calibration calls).  The check assumes that giving a
head back never lowers the PSNR (true of the error's expectation, not of every sample); the trials are
recorded in the plan (``plan.calibration["output_check"]``), so what was met is visible, not assumed.  The check
covers the sites that ran sparse in it (``sparse_sites``): where a cost model leaves a tiled site dense on this
device, that site's heads were not checked, and on a device where it runs sparse the plan may err more; check a
plan meant for other devices with every tiled site rewritten (``cost_model="always"``, as ``vdit-compile
calibrate --output-psnr`` does).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..masks.tile import TileMask
from ..plans.plan import per_head

#: What a trial returns: the samples (or transformer outputs) of the calibration run, one tensor each.
Samples = Sequence[torch.Tensor]


@dataclass
class OutputCheckResult:
    """What the check measured: ``trials`` are ``(heads given back, PSNR dB)`` in the order they ran."""

    target_psnr: float
    candidates: list[str] = field(default_factory=list)  # "site/head" in the order heads are given back
    trials: list[tuple[int, float]] = field(default_factory=list)
    given_back: list[str] = field(default_factory=list)
    psnr: float | None = None  # of the chosen plan (inf: every head given back, i.e. the dense samples, not run)
    met: bool = False
    sparse_sites: list[str] | None = None  # the sites that ran sparse in the first trial (None: unknown)

    def to_dict(self) -> dict:
        return {"target_psnr": self.target_psnr, "candidates": self.candidates,
                "trials": [[k, _finite(p)] for k, p in self.trials], "given_back": self.given_back,
                "psnr": _finite(self.psnr), "met": self.met, "sparse_sites": self.sparse_sites}


def _finite(x):
    return None if x is None else (x if math.isfinite(x) else "inf")


def output_tensor(out) -> torch.Tensor:
    """The sample tensor in a pipeline's or a model's output: a tensor, the first field of a diffusers output
    (``frames``, ``images``, ``sample``, ...), the first element of a tuple, or frames as numpy arrays."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        values = list(out.values()) if isinstance(out, dict) else list(out.to_tuple())
        if values:
            return output_tensor(values[0])
    if isinstance(out, (tuple, list)) and out:
        if isinstance(out, list) and len(out) > 1 and all(isinstance(o, torch.Tensor) for o in out):  # per-video
            return torch.stack([o.detach() for o in out])
        return output_tensor(out[0])
    try:
        import numpy as np

        return torch.from_numpy(np.asarray(out, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected the output to hold a tensor (or numpy frames) to compare; found "
                        f"{type(out).__name__}") from exc


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of ``x`` against ``ref`` in dB, peak = ``ref``'s value range (for frames in [0, 1] the usual PSNR);
    ``inf`` when they are equal."""
    if x.shape != ref.shape:
        raise ValueError(f"output check: expected a sample of shape {tuple(ref.shape)} (the dense one's); found "
                         f"{tuple(x.shape)}")
    x, ref = x.double(), ref.double()
    mse = float((x - ref).pow(2).mean())
    peak = float(ref.max() - ref.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def min_psnr(samples: Samples, reference: Samples) -> float:
    """The worst sample's PSNR (the check holds for every calibration sample, not on average)."""
    if len(samples) != len(reference):
        raise ValueError(f"output check: expected {len(reference)} sample(s), found {len(samples)}")
    return min(psnr(s, r) for s, r in zip(samples, reference))


def give_back_order(plan, rewritten: set[str] | None = None) -> list[tuple[str, int]]:
    """The sparse heads ``(site, head)`` worth giving back, worst first: calibrated squared error per density
    saved (a head that errs much and saves little goes first).  Only sites in ``rewritten`` (those the cost
    model lets run sparse; ``None``: every tiled site) count: elsewhere a head costs nothing."""
    items = []
    for sp in plan.sites:
        if not sp.tiled or (rewritten is not None and sp.name not in rewritten):
            continue
        ranges = [per_head(r.masks, sp.num_heads) for r in sp.step_ranges or []]
        for h, m in enumerate(per_head(sp.masks, sp.num_heads)):
            sparse = not m.dense or any(not r[h].dense for r in ranges)
            if not sparse:
                continue
            err = sp.errors[h] if h < len(sp.errors) and sp.errors[h] is not None else 0.0
            dens = sp.densities[h] if h < len(sp.densities) else 1.0
            items.append((err ** 2 / max(1.0 - dens, 1e-6), err, sp.name, h))
    items.sort(key=lambda t: (-t[0], -t[1], t[2], t[3]))
    return [(name, h) for _, _, name, h in items]


def with_dense_heads(plan, heads: Sequence[tuple[str, int]], why: str = "given back by the output check"):
    """A copy of ``plan`` in which ``heads`` (``(site, head)``) attend densely, in every step range; a site whose
    heads all became dense is marked dense."""
    out = copy.deepcopy(plan)
    by_site: dict[str, list[int]] = {}
    for name, h in heads:
        by_site.setdefault(name, []).append(h)
    dense = TileMask(dense=True)
    for name, hs in by_site.items():
        sp = out.site(name)
        if sp is None:
            raise KeyError(f"output check: site {name!r} is not in the plan")
        sp.masks = per_head(sp.masks, sp.num_heads)
        for r in sp.step_ranges or []:
            r.masks = per_head(r.masks, sp.num_heads)
        for h in hs:
            sp.masks[h] = dense
            if h < len(sp.densities):
                sp.densities[h] = 1.0
            for r in sp.step_ranges or []:
                r.masks[h] = dense
                if h < len(r.densities):
                    r.densities[h] = 1.0
        sp.notes = list(sp.notes) + [f"head {h}: {why}" for h in sorted(hs)]
        if all(m.dense for m in sp.masks) and all(m.dense for r in sp.step_ranges or [] for m in r.masks):
            sp.status, sp.reason = "dense", f"every sparse head {why}"
            sp.tile, sp.step_ranges = None, None
    return out


def check_plan(plan, trial: Callable[[object], tuple[Samples, set[str] | None]], reference: Samples,
               target_psnr: float, max_trials: int = 8, echo: Callable[[str], None] | None = None):
    """``(plan, OutputCheckResult)``: ``plan`` if its samples meet ``target_psnr`` against ``reference``, else
    the plan with the fewest heads given back (a prefix of :func:`give_back_order`) that the trials found to
    meet it, by bisection within ``max_trials`` runs.  ``trial(plan)`` runs the calibration samples under a
    plan and returns them with the set of sites that ran sparse (``None``: unknown)."""
    if not target_psnr > 0 or not math.isfinite(target_psnr):
        raise ValueError(f"output_psnr must be a positive number of dB, found {target_psnr}")
    if max_trials < 1:
        raise ValueError(f"output check: max_trials must be >= 1, found {max_trials}")
    res = OutputCheckResult(target_psnr)
    samples, rewritten = trial(plan)
    res.sparse_sites = None if rewritten is None else sorted(rewritten)  # what the check covers (cost model's say)
    first = min_psnr(samples, reference)
    res.trials.append((0, first))
    order = give_back_order(plan, rewritten)
    res.candidates = [f"{n}/{h}" for n, h in order]
    say = echo or (lambda s: None)
    say(f"output check: the plan's samples {first:.2f} dB against dense (target {target_psnr:g} dB); "
        f"{len(order)} sparse head(s) on sites that run sparse")
    if first >= target_psnr or not order:
        res.psnr, res.met = first, first >= target_psnr
        return plan, res
    lo, hi, hi_psnr = 0, len(order), None  # lo misses the target; hi meets it (every head back: the dense samples)
    while hi - lo > 1 and len(res.trials) < max_trials:
        mid = (lo + hi) // 2
        p = min_psnr(trial(with_dense_heads(plan, order[:mid]))[0], reference)
        res.trials.append((mid, p))
        say(f"output check: {mid} of {len(order)} head(s) given back -> {p:.2f} dB")
        if p >= target_psnr:
            hi, hi_psnr = mid, p
        else:
            lo = mid
    res.given_back = [f"{n}/{h}" for n, h in order[:hi]]
    res.psnr, res.met = hi_psnr, True
    if hi == len(order):
        res.psnr = math.inf  # every sparse head back: the samples are the dense ones (not run)
    return with_dense_heads(plan, order[:hi]), res
