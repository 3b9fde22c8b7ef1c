"""Step-aware plans: split the denoising timesteps into contiguous ranges that each get their own masks.

Attention at high-noise steps is more global than at low-noise steps (or the other way round, per head):
one mask for every step must fit the worst step, masks per range of steps only that range's. The split is
chosen *once for the whole model* (every step-aware site shares the bounds: the runtime picks one compiled
graph per range, :meth:`~vdit_compile.plans.Plan.step_range_of`): exhaustively over the split points of the
observed timesteps (``S`` distinct values, ``K`` ranges: ``C(S-1, K-1)`` splits), minimising the
call-weighted mean density of all calibrated sites. Ties go to fewer ranges (fewer compilations).

**How a split's masks are chosen** (:func:`allocate_ranges`, per head). Choosing every range's sparsest mask
within the budget on that range's calls alone spends the whole budget in every range; the step-agnostic
choice, the sparsest mask within the budget pooled over all calls, usually stays below it (the next sparser
candidate is over). Measured on the embedded model, the first cost 10 dB of PSNR against dense. So a range's
masks are chosen *together* with the other ranges': per head, the combination of one candidate per range with
the least call-weighted density such that

1. each range's relative error, on its own calls, is within the budget, and
2. the squared output error summed over *all* calls is at most that of the step-agnostic choice, or, when
   that is smaller, ``(POOLED_FLOOR * budget)^2`` of the dense output's squared norm (a pooled relative
   error of half the budget).

So a step-aware head has no more pooled error than the plan without step ranges, except up to half the
budget where that plan's choice errs less (mostly: heads that need dense attention at some steps only, the
case step ranges are for); the error is moved to the steps where it buys the most density. (An exact
multiple-choice knapsack: a Pareto frontier of (density, error) merged range by range.)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations, pairwise

from .allocation import capped_choice, within_density
from .collector import SiteCalibrator

#: A head may spend pooled relative error up to this fraction of the budget across step ranges even where the
#: step-agnostic choice spends less (a head that needs dense attention at some steps only), module doc.
POOLED_FLOOR = 0.5


def allocate_ranges(cal: SiteCalibrator, ranges: Sequence[Sequence], error_budget: float,
                    max_density: float | None = None, floor: float = POOLED_FLOOR,
                    selection: str = "head") -> list[list[int]]:
    """Per range, the candidate index of every head (module doc: each range within the budget on its own
    calls; pooled over all calls, the squared error at most the step-agnostic choice's or ``(floor *
    budget)^2`` of the dense output's squared norm, whichever is larger; least call-weighted density).
    ``selection="tile-capped"`` (:mod:`.allocation`): the step-agnostic choice is that rule's and the floor is 0, so
    no head errs more, pooled, than the step-agnostic plan, whose site errs at most as much as frame tiles would."""
    return _allocate(cal, [cal.error_sums(r) for r in ranges], [sum(cal.step_calls(t) for t in r) for r in ranges],
                     cal.candidate_densities(), error_budget, max_density, floor, selection)


def _allocate(cal: SiteCalibrator, sums: list, weights: list, dens: list[float], error_budget: float,
              max_density: float | None, floor: float = POOLED_FLOOR, selection: str = "head") -> list[list[int]]:
    err_all = sum(e for e, _ in sums)
    norm_all = sum(n for _, n in sums)
    single, notes = cal.choose((err_all / norm_all.clamp(min=1e-300)[:, None]).sqrt(), dens, error_budget,
                               max_density)
    if selection != "head":
        capped = capped_choice(cal, err_all, norm_all, dens, error_budget, max_density, single, notes)
        single, floor = capped or single, 0.0
    own = [cal.choose((e / n.clamp(min=1e-300)[:, None]).sqrt(), dens, error_budget, max_density)
           for e, n in sums]
    in_bound = within_density(dens, max_density)
    picks: list[list[int]] = [[0] * cal.num_heads for _ in sums]
    for h in range(cal.num_heads):
        fixed = [own[r][0][h] if own[r][1][h] else None for r in range(len(sums))]  # over budget: reported as such
        best = allocate_head([e[h].tolist() for e, _ in sums], [float(n[h]) for _, n in sums], weights, dens,
                             error_budget, single[h], in_bound, fixed, floor)
        for r in range(len(sums)):
            picks[r][h] = best[r] if best is not None else own[r][0][h]
    return picks


def allocate_head(errs: Sequence[Sequence[float]], norms: Sequence[float], weights: Sequence[float],
                  dens: Sequence[float], error_budget: float, single: int, in_bound: Sequence[bool] | None = None,
                  fixed: Sequence[int | None] | None = None, floor: float = POOLED_FLOOR) -> list[int] | None:
    """One head's candidate per range (``None`` when no combination fits): ``errs[r][c]`` is candidate ``c``'s
    squared output error summed over range ``r``'s calls, ``norms[r]`` the dense output's squared norm there,
    ``weights[r]`` the range's calls, ``single`` the step-agnostic choice; ``fixed[r]`` forces a range's
    candidate (no candidate within the budget there).  Least ``sum_r weights[r] * dens[c_r]`` such that every
    range's relative error is within the budget and the summed squared error is at most ``single``'s or
    ``(floor * budget)^2 * sum(norms)``, whichever is larger (module doc)."""
    cap = max(sum(e[single] for e in errs), (floor * error_budget) ** 2 * sum(norms)) * (1 + 1e-9)
    options = []
    for r, (eh, n) in enumerate(zip(errs, norms)):
        lim = error_budget ** 2 * n * (1 + 1e-9)
        if fixed is not None and fixed[r] is not None:
            feas = [fixed[r]]
        else:
            feas = [c for c in range(len(dens)) if (in_bound is None or in_bound[c]) and eh[c] <= lim]
        options.append(_pareto([(weights[r] * dens[c], eh[c], c) for c in feas]))
    return _cheapest(options, cap)


def _pareto(opts: list[tuple[float, float, int]]) -> list[tuple[float, float, tuple]]:
    """The (cost, error) Pareto frontier of ``opts`` (cheapest first; ties: lower error, earlier candidate)."""
    out: list[tuple[float, float, tuple]] = []
    for cost, err, c in sorted(opts, key=lambda o: (o[0], o[1], o[2])):
        if not out or err < out[-1][1]:
            out.append((cost, err, (c,) if isinstance(c, int) else c))
    return out


def _cheapest(options: list[list[tuple[float, float, tuple]]], cap: float) -> tuple | None:
    """The cheapest combination (one option per range) with summed error <= ``cap``, or None."""
    front: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for opts in options:
        merged = [(c0 + c1, e0 + e1, p0 + p1) for c0, e0, p0 in front for c1, e1, p1 in opts if e0 + e1 <= cap]
        front = _pareto(merged)
        if not front:
            return None
    return front[0][2]


def choose_step_ranges(calibrators: Mapping[str, SiteCalibrator] | Sequence[SiteCalibrator], max_ranges: int,
                       error_budget: float, max_density: float | None = None,
                       selection: str = "head") -> list[list[float]] | None:
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
    dens = [c.candidate_densities() for c in cals]
    sums: dict[tuple[int, int, int], tuple] = {}  # (site, i, j) -> error sums of steps i..j-1

    def part(s: int, a: int, b: int):
        if (s, a, b) not in sums:
            sums[(s, a, b)] = cals[s].error_sums(ts[a:b])
        return sums[(s, a, b)]

    def cost(bounds: tuple) -> float:  # calls-weighted sum over sites of the mean head density
        w = [sum(calls[a:b]) for a, b in pairwise(bounds)]
        total = 0.0
        for s, c in enumerate(cals):
            picks = _allocate(c, [part(s, a, b) for a, b in pairwise(bounds)], w, dens[s], error_budget, max_density,
                              selection=selection)
            total += sum(sum(calls[a:b]) * sum(dens[s][i] for i in p) / len(p)
                         for (a, b), p in zip(pairwise(bounds), picks))
        return total

    best, best_bounds = cost((0, S)), (0, S)
    for k in range(2, min(max_ranges, S) + 1):
        for cut in combinations(range(1, S), k - 1):
            bounds = (0, *cut, S)
            total = cost(bounds)
            if total < best - 1e-9 * max(1.0, best):
                best, best_bounds = total, bounds
    if len(best_bounds) == 2:
        return None
    return [ts[a:b] for a, b in pairwise(best_bounds)]
