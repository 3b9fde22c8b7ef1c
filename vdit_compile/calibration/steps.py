"""Step-aware plans: split the denoising timesteps into contiguous ranges that each get their own masks.

Attention at high-noise steps is more global than at low-noise steps (or the other way round, per head):
one mask for every step must fit the worst step, masks per range of steps only that range's. The split is
chosen *once for the whole model* (every step-aware site shares the bounds: the runtime picks one compiled
graph per range, :meth:`~vdit_compile.plans.Plan.step_range_of`): exhaustively over the split points of the
observed timesteps (``S`` distinct values, ``K`` ranges: ``C(S-1, K-1)`` splits, each range scored once and
cached), minimising the call-weighted mean density of all calibrated sites with every head of every range
within the error budget. Ties go to fewer ranges (fewer compilations).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations, pairwise

import torch

from .collector import SiteCalibrator


def head_densities(cal: SiteCalibrator, timesteps: Sequence, error_budget: float,
                   max_density: float | None) -> torch.Tensor:
    """``(H,)`` density of the mask :meth:`SiteCalibrator.result` would pick per head on ``timesteps``."""
    errs = cal.candidate_errors(timesteps)
    dens = torch.tensor(cal.candidate_densities(), dtype=torch.float64)
    in_bound = torch.ones_like(dens, dtype=torch.bool) if max_density is None else dens <= max_density + 1e-12
    feasible = (errs <= error_budget) & in_bound[None]
    best = torch.where(feasible, dens[None], torch.inf).amin(1)
    if bool(torch.isinf(best).any()):  # some head has no feasible candidate: the slow path says what it takes
        picks, _ = cal.choose(errs, dens.tolist(), error_budget, max_density)
        best = dens[torch.tensor(picks)]
    return best


def choose_step_ranges(calibrators: Mapping[str, SiteCalibrator] | Sequence[SiteCalibrator], max_ranges: int,
                       error_budget: float, max_density: float | None = None) -> list[list[float]] | None:
    """The timesteps of each range (high timesteps first), or ``None`` when one range is best or possible.

    Calls without a readable timestep make a site step-agnostic: then no split is made.
    """
    cals = list(calibrators.values()) if isinstance(calibrators, Mapping) else list(calibrators)
    cals = [c for c in cals if c.observations]
    if max_ranges <= 1 or not cals or any(None in c.timesteps for c in cals):
        return None
    ts = sorted({t for c in cals for t in c.timesteps}, reverse=True)
    S = len(ts)
    if S < 2:
        return None
    calls = [max(c.step_calls(t) for c in cals) for t in ts]
    cache: dict[tuple[int, int], float] = {}

    def cost(i: int, j: int) -> float:  # calls-weighted sum over sites of the mean head density, steps i..j-1
        if (i, j) not in cache:
            sub = ts[i:j]
            cache[(i, j)] = sum(calls[i:j]) * sum(float(head_densities(c, sub, error_budget, max_density).mean())
                                                  for c in cals)
        return cache[(i, j)]

    best, best_bounds = cost(0, S), (0, S)
    for k in range(2, min(max_ranges, S) + 1):
        for cut in combinations(range(1, S), k - 1):
            bounds = (0, *cut, S)
            total = sum(cost(a, b) for a, b in pairwise(bounds))
            if total < best - 1e-9 * max(1.0, best):
                best, best_bounds = total, bounds
    if len(best_bounds) == 2:
        return None
    return [ts[a:b] for a, b in pairwise(best_bounds)]
