"""Turn the calibrators of a calibration run into a :class:`~vdit_compile.plans.Plan`."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from ..kinds import SiteKind
from ..masks.base import MaskSpec, parse_mask
from ..plans.fingerprint import model_class_name, model_fingerprint, structure_summary
from ..plans.plan import DEFAULT_ERROR_BUDGET, TILEABLE_KINDS, Plan, SitePlan, StepRange
from .allocation import check_selection, site_picks
from .collector import SiteCalibrator
from .steps import allocate_ranges, choose_step_ranges

#: How masks generalise to another frame count; recorded in every plan (docs/calibration.md).
MASK_RULE = ("units-v2: per head a mask spec stated in units (frames or the site's token tile), kept as is at any T, "
             "g clamped to T; text rows/columns always kept")


@dataclass
class CalibrationSettings:
    """What a calibration run used; stored verbatim in the plan's ``calibration`` field."""

    error_budget: float = DEFAULT_ERROR_BUDGET
    max_density: float | None = None
    candidates: list[str] | None = None  # mask names; None = the default family per site
    num_prompts: int | None = None
    num_inputs: int | None = None  # transformer calls observed
    num_inference_steps: int | None = None
    families: list[str] | None = None  # mask families searched (None: OptimizeConfig's default)
    step_ranges: int = 1  # at most this many ranges of denoising steps with their own masks
    tile_tokens: int | None = None  # token tile target of window families (None: plans.default_tile's rule)
    selection: str = "head"  # how a site's heads share the budget: "head" or "tile-capped" (calibration.allocation)
    checkpoint: str | None = None  # resumable statistics file (OptimizeConfig.calib_checkpoint)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.error_budget >= 0:
            raise ValueError(f"error_budget must be >= 0, found {self.error_budget}")
        if self.max_density is not None and not 0 < self.max_density <= 1:
            raise ValueError(f"max_density must be in (0, 1], found {self.max_density}")
        if isinstance(self.step_ranges, bool) or not isinstance(self.step_ranges, int) or self.step_ranges < 1:
            raise ValueError(f"step_ranges must be an int >= 1, found {self.step_ranges!r}")
        check_selection(self.selection)

    def candidate_masks(self) -> list[MaskSpec] | None:
        return None if self.candidates is None else [parse_mask(c) for c in self.candidates]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint", None)  # where statistics were kept says nothing about the plan
        d["mask_rule"] = MASK_RULE
        return d


def build_plan(
    model,
    calibrators: Mapping[str, SiteCalibrator] | Iterable[SiteCalibrator],
    settings: CalibrationSettings | None = None,
    sites: Sequence | None = None,
    picks: Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """Choose masks from every calibrator and assemble the plan for ``model``.

    ``sites`` (the detected ``AttentionSite`` list) gives kinds and keeps non-tileable sites
    in the plan as dense with their reason; without it, every calibrator becomes a
    ``video_self`` site.  A tileable site that was never reached during calibration is left
    dense, with a warning.  ``picks`` (site name -> candidate index per head) replaces the
    selection rule's choice at those sites, for experiments with other rules (one mask set
    per site: not with step ranges).
    """
    settings = settings or CalibrationSettings()
    picks = dict(picks or {})
    if picks and settings.step_ranges != 1:
        raise ValueError(f"picks give one mask set per site; found step_ranges={settings.step_ranges} (expected 1)")
    if not isinstance(calibrators, Mapping):
        calibrators = {c.name: c for c in calibrators}
    if sites is None:
        sites = [_SiteStub(c.name, SiteKind.VIDEO_SELF, c.layout, c.num_heads, "") for c in calibrators.values()]
    tileable = {n: c for n, c in calibrators.items()
                if any(s.name == n and s.kind in TILEABLE_KINDS and s.layout is not None for s in sites)}
    fixed = [c.step_ranges for c in tileable.values() if c.step_ranges is not None]
    ranges = fixed[0] if fixed else choose_step_ranges(tileable, settings.step_ranges, settings.error_budget,
                                                        settings.max_density, settings.selection)
    out: list[SitePlan] = []
    for s in sites:
        cal = calibrators.get(s.name)
        tileable = s.kind in TILEABLE_KINDS and s.layout is not None
        if not tileable:
            out.append(SitePlan(s.name, s.kind, s.layout, int(s.num_heads), "dense", s.reason or f"kind {s.kind} is not tiled"))
        elif cal is None or cal.observations == 0:
            warnings.warn(f"site {s.name} was not reached during calibration; it stays dense", stacklevel=2)
            out.append(SitePlan(s.name, s.kind, s.layout, int(s.num_heads), "dense", "not reached during calibration"))
        else:
            out.append(_site_plan(s, cal, settings, ranges, picks.get(s.name)))
    calib = settings.to_dict()
    calib["candidates"] = sorted({m.name for c in calibrators.values() for m in c.candidates},
                                 key=lambda n: (n == "dense", n))
    return Plan(out, model_class_name(model), model_fingerprint(model), structure_summary(model), calib)


def _site_plan(site, cal: SiteCalibrator, settings: CalibrationSettings, ranges: list[list[float]] | None = None,
               fixed: Sequence[int] | None = None) -> SitePlan:
    """The site's plan entry: per-head masks (per step range when ``ranges`` is given), its token tile (None
    when every chosen mask is frame-level: no reorder at run time) and the calibration evidence."""
    budget, bound = settings.error_budget, settings.max_density
    if ranges:
        picks = allocate_ranges(cal, ranges, budget, bound, selection=settings.selection)
        results = [cal.result(budget, bound, r, p) for r, p in zip(ranges, picks)]
    else:
        if fixed is None:
            head_picks = site_picks(cal, budget, bound, None, settings.selection)
        else:
            head_picks, n = [int(i) for i in fixed], len(cal.candidates)
            if len(head_picks) != cal.num_heads or not all(0 <= i < n for i in head_picks):
                raise ValueError(f"site {site.name}: picks must give one candidate index in [0, {n}) per head "
                                 f"({cal.num_heads} heads); found {list(fixed)}")
        results = [cal.result(budget, bound, None, head_picks)]
    res = results[0]
    chosen = [m for r in results for m in r.masks]
    if all(m.dense for m in chosen):
        status, reason = "dense", f"every head needs dense attention to stay within error {budget:g}"
    else:
        over = sum(not ok for r in results for ok in r.within_budget)
        status = "tiled"
        reason = f"calibrated on {cal.observations} call(s)" + (f"; {over} head(s) over budget" if over else "")
    tile = (cal.grid.tile_h, cal.grid.tile_w) if any(m.needs_tiles and not m.dense for m in chosen) else None
    step_ranges = None
    if ranges and any([m.name for m in r.masks] != [m.name for m in res.masks] for r in results):
        step_ranges = [StepRange(min(r) if i < len(ranges) - 1 else None, rr.masks, rr.densities)
                       for i, (r, rr) in enumerate(zip(ranges, results))]
        reason += "; step-aware: " + ", ".join(f"t>={sr.min_timestep:g}: {_mean(sr.densities):.3f}"
                                               if sr.min_timestep is not None else f"rest: {_mean(sr.densities):.3f}"
                                               for sr in step_ranges)
    notes = [n for r in results for n in r.notes if n] if ranges else res.notes
    all_errs = cal.candidate_errors()
    cand = {m.name: all_errs[:, c].tolist() for c, m in enumerate(res.candidates)}
    return SitePlan(site.name, site.kind, site.layout, int(site.num_heads), status, reason, res.masks, res.errors,
                    res.densities, res.frame_mass.tolist(), cand, notes, tile=tile, step_ranges=step_ranges)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def prepare_verification(calibrators: Mapping[str, SiteCalibrator], config) -> bool:
    """Before a second pass over the calibration inputs: calibrators on block mass statistics (the ``mass``
    method) choose their step ranges and masks from the estimate and switch to scoring, exactly, only the
    chosen candidates and a few denser fallbacks (:meth:`SiteCalibrator.begin_verify`).  True when a
    second pass is needed (``config``: an OptimizeConfig or CalibrationSettings)."""
    cals = {n: c for n, c in calibrators.items() if c.needs_verification}
    if not cals:
        return False
    budget, bound = config.error_budget, config.max_density
    ranges = choose_step_ranges(calibrators, getattr(config, "step_ranges", 1), budget, bound,
                                getattr(config, "selection", "head"))
    for c in calibrators.values():
        c.step_ranges = ranges
    for c in cals.values():
        c.begin_verify(budget, bound, ranges)
    return True


@dataclass
class _SiteStub:
    name: str
    kind: str
    layout: object
    num_heads: int
    reason: str
