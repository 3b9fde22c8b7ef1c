"""How the heads of a site share the error budget: the selection rules of calibration.

``head`` (the default): every head takes its sparsest candidate whose relative L2 output error is within the
budget (:meth:`~.collector.SiteCalibrator.choose`).  Each head spends up to the whole budget, wherever it sits.

``tile-capped``: each head is still within the budget, and in addition the site's squared output error summed
over its heads (and calls) is at most what the frame-tile family alone would spend at this budget (the ``head``
rule restricted to frame-level candidates: tile masks and ``dense``).  Among the combinations that satisfy both,
the one with the least mean density (an exact multiple-choice knapsack over the heads: a Pareto frontier of
density and error, merged head by head; ties: less error).  So the extra families (3D and spatial windows) are
used to save density at the error frame tiles would spend, never to spend more: a site's plan is at most as
dense as the frame-tile plan's and errs at most as much, on the calibration data.  Why (docs/calibration.md,
"The curve"): under the ``head`` rule the windows let every head spend its budget, also at the sites and steps
where frame tiles leave the heads dense, and at densities 0.85-0.95 the videos lost 1-4 dB of PSNR against
frame-tile plans of the same density although the pooled per-head error was lower.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: The selection rules (module doc); ``head`` is the default.
SELECTIONS = ("head", "tile-capped")


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, found {selection!r}")
    return selection


def frame_level(cal) -> list[bool]:
    """Per candidate of ``cal``: True for the frame-tile family and ``dense`` (the ``tile-capped`` reference)."""
    return [m.dense or m.family == "tile" for m in cal.candidates]


def capped_picks(err: torch.Tensor, norm: torch.Tensor, dens: Sequence[float], error_budget: float,
                 reference: Sequence[bool], in_bound: Sequence[bool] | None = None,
                 fixed: Sequence[int | None] | None = None) -> list[int] | None:
    """One candidate per head under the ``tile-capped`` rule (module doc), or ``None`` when no combination fits.

    ``err[h, c]``: candidate ``c``'s squared output error of head ``h`` summed over the calls, ``norm[h]`` the dense
    output's squared norm; ``reference[c]``: the candidate is frame-level; ``in_bound[c]``: within ``max_density``;
    ``fixed[h]`` forces a head's candidate (no candidate within the budget: reported as over budget).  The cap is
    the summed error of the reference choice: per head the sparsest frame-level candidate within the budget (ties:
    less error, then the earlier candidate), or the least-error one where none is.
    """
    from .steps import _cheapest, _pareto

    H, C = err.shape
    ok = [in_bound is None or in_bound[c] for c in range(C)]
    cap = 0.0
    options = []
    for h in range(H):
        e = err[h].tolist()
        lim = error_budget ** 2 * float(norm[h]) * (1 + 1e-9)
        ref = [c for c in range(C) if reference[c] and ok[c]] or [c for c in range(C) if ok[c]]
        within = [c for c in ref if e[c] <= lim]
        cap += e[min(within, key=lambda c: (dens[c], e[c], c))] if within else min(e[c] for c in ref)
        if fixed is not None and fixed[h] is not None:
            feas = [fixed[h]]
        else:
            feas = [c for c in range(C) if ok[c] and e[c] <= lim]
        options.append(_pareto([(dens[c], e[c], c) for c in feas]))
    best = _cheapest(options, cap * (1 + 1e-9))
    return None if best is None else list(best)


def site_picks(cal, error_budget: float, max_density: float | None = None, timesteps=None,
               selection: str = "head") -> list[int] | None:
    """The candidate of every head of ``cal`` on the calls at ``timesteps`` (``None``: all) under ``selection``;
    ``None`` for the ``head`` rule (then :meth:`~.collector.SiteCalibrator.result` chooses) or when the cap cannot
    be met (then too)."""
    if check_selection(selection) == "head":
        return None
    err, norm = cal.error_sums(timesteps)
    dens = cal.candidate_densities()
    own, notes = cal.choose((err / norm.clamp(min=1e-300)[:, None]).sqrt(), dens, error_budget, max_density)
    return capped_choice(cal, err, norm, dens, error_budget, max_density, own, notes)


def within_density(dens: Sequence[float], max_density: float | None) -> list[bool]:
    """Per candidate: its density is within ``max_density`` (``None``: no bound)."""
    return [max_density is None or d <= max_density + 1e-12 for d in dens]


def capped_choice(cal, err: torch.Tensor, norm: torch.Tensor, dens: Sequence[float], error_budget: float,
                  max_density: float | None, own: Sequence[int], notes: Sequence[str]) -> list[int] | None:
    """:func:`capped_picks` for ``cal`` with frame tiles as the reference, given the ``head`` rule's choice
    ``own, notes`` (:meth:`~.collector.SiteCalibrator.choose`): a head it reports over budget keeps its candidate."""
    fixed = [None if not n else c for c, n in zip(own, notes)]
    return capped_picks(err, norm, dens, error_budget, frame_level(cal), within_density(dens, max_density), fixed)
