"""The versioned JSON plan: which mask every attention site and head gets, and why.

A plan is the product of calibration and the input of the rewrite pass.  It records the model
it was made for (class and structure fingerprint), every detected attention site with its kind
and token layout, the per-head masks of tiled sites with the error and density measured on the
calibration data, the frame-by-frame attention mass (for ``plan show``), and the calibration
settings.  See docs/calibration.md for the format.

Masks are any registered family (:mod:`vdit_compile.masks`), one per head, stated in units (frames or
the site's token ``tile``), so they are parametric in the frame count ``T``: a plan made at ``T`` frames
serves a run at ``T'`` frames.  Everything else in the layout (frame height/width in tokens, text
prefix/suffix, token order) and the head count must match, or the plan is refused.

Step-aware sites hold ``step_ranges``: masks per range of the denoising timestep the transformer
receives (high timesteps first); the top-level ``masks`` are the first range's (used when a call has no
timestep).  Version 2 added ``tile`` and ``step_ranges``; version 1 plans (frame tiles) still load.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..kinds import TILEABLE_KINDS  # noqa: F401 - re-exported: the plan format's tileable kinds
from ..layout import TokenLayout
from ..masks.base import MaskSpec, masks_density, parse_mask
from ..masks.units import UnitGrid
from .fingerprint import model_class_name, model_fingerprint, structure_summary

PLAN_FORMAT = "vdit-compile-plan"
PLAN_VERSION = 2
#: versions this code reads (1: frame tiles only, no tile/step ranges)
READABLE_VERSIONS = (1, 2)

#: Default per-head budget on the relative L2 error of the attention output (see docs/calibration.md).
DEFAULT_ERROR_BUDGET = 0.05


class PlanError(ValueError):
    """A plan file that cannot be read (bad JSON, unknown format or version, malformed entries)."""


class PlanMismatchError(ValueError):
    """A plan that does not fit the model or the inputs it is asked to serve; ``.differences`` lists why."""

    def __init__(self, differences: Sequence[str], source: str = "plan"):
        self.differences = list(differences)
        super().__init__(f"{source} does not fit this model:\n  - " + "\n  - ".join(self.differences))


def _layout_key(layout: TokenLayout) -> tuple:
    return (layout.height, layout.width, layout.text_prefix, layout.text_suffix, layout.order)


def layout_differences(planned: TokenLayout, actual: TokenLayout) -> list[str]:
    """What differs between two layouts beyond the frame count (which masks handle parametrically)."""
    out = []
    for f in ("height", "width", "text_prefix", "text_suffix", "order"):
        a, b = getattr(planned, f), getattr(actual, f)
        if a != b:
            out.append(f"{f} {a!r} in the plan, {b!r} now")
    return out


def per_head(masks: Sequence[MaskSpec], num_heads: int) -> list[MaskSpec]:
    """One mask per head: a plan stores a single mask once when every head shares it."""
    return list(masks) * num_heads if len(masks) == 1 else list(masks)


@dataclass
class StepRange:
    """Masks for the calls whose timestep is ``>= min_timestep`` (and below the previous range's bound).

    ``min_timestep=None`` closes the list (every lower timestep).  Timesteps are the values the
    transformer receives (diffusers: ``timestep``), so ranges survive a change of the step count.
    """

    min_timestep: float | None
    masks: list[MaskSpec]
    densities: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"min_timestep": self.min_timestep, "masks": [m.name for m in self.masks],
                "densities": [_num(x) for x in self.densities]}

    @classmethod
    def from_dict(cls, d: dict) -> "StepRange":
        mt = d.get("min_timestep")
        return cls(None if mt is None else float(mt), [parse_mask(m) for m in d["masks"]],
                   list(d.get("densities", [])))


def step_range_index(ranges: Sequence[StepRange], timestep: float) -> int:
    """Index of the range holding ``timestep`` (ranges ordered from high to low timesteps)."""
    for i, r in enumerate(ranges):
        if r.min_timestep is None or timestep >= r.min_timestep:
            return i
    return len(ranges) - 1


@dataclass
class SitePlan:
    """One attention site of a plan (``status`` is ``"tiled"`` or ``"dense"``; ``reason`` says why)."""

    name: str
    kind: str
    layout: TokenLayout | None
    num_heads: int
    status: str = "dense"
    reason: str = ""
    masks: list[MaskSpec] = field(default_factory=list)
    errors: list[float | None] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    frame_mass: list | None = None  # (H, T+1, T+1) nested lists; text is the last index
    candidate_errors: dict[str, list[float]] | None = None
    notes: list[str] = field(default_factory=list)
    tile: tuple[int, int] | None = None  # token tile (rows, cols) of window families; None = whole frames
    step_ranges: list[StepRange] | None = None  # step-aware masks, high timesteps first

    @property
    def tiled(self) -> bool:
        return self.status == "tiled"

    @property
    def density(self) -> float:
        return sum(self.densities) / len(self.densities) if self.densities else 1.0

    def masks_for(self, layout: TokenLayout, step_range: int | None = None) -> list[MaskSpec]:
        """Per-head masks for a run with ``layout`` (another frame count is fine: masks are parametric in T);
        ``step_range`` picks a step-aware site's range (``None``: the top-level masks)."""
        if self.layout is None:
            raise PlanMismatchError([f"site {self.name}: the plan has no token layout for it"])
        diffs = layout_differences(self.layout, layout)
        if diffs:
            raise PlanMismatchError([f"site {self.name}: layout differs: " + "; ".join(diffs)])
        masks = self.masks
        if step_range is not None and self.step_ranges:
            masks = self.step_ranges[min(step_range, len(self.step_ranges) - 1)].masks
        return per_head(masks, self.num_heads)

    def unit_grid(self, layout: TokenLayout | None = None) -> UnitGrid:
        lay = layout or self.layout
        th, tw = self.tile if self.tile is not None else (lay.height, lay.width)
        return UnitGrid(lay.num_frames, lay.height, lay.width, th, tw, frame_minor=lay.order == "HWT")

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "num_heads": self.num_heads,
            "layout": self.layout.to_dict() if self.layout is not None else None,
            "status": self.status,
            "reason": self.reason,
            "masks": [m.name for m in self.masks],
            "errors": [_num(e) for e in self.errors],
            "densities": [_num(x) for x in self.densities],
            "density": _num(self.density),
        }
        if self.notes and any(self.notes):
            d["notes"] = list(self.notes)
        if self.tile is not None:
            d["tile"] = list(self.tile)
        if self.step_ranges:
            d["step_ranges"] = [r.to_dict() for r in self.step_ranges]
        if self.candidate_errors is not None:
            d["candidate_errors"] = {k: [_num(e) for e in v] for k, v in self.candidate_errors.items()}
        if self.frame_mass is not None:
            d["frame_mass"] = _round_nested(self.frame_mass)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SitePlan":
        try:
            layout = TokenLayout.from_dict(d["layout"]) if d.get("layout") is not None else None
            sp = cls(
                name=d["name"], kind=d["kind"], layout=layout, num_heads=int(d["num_heads"]),
                status=d.get("status", "dense"), reason=d.get("reason", ""),
                masks=[parse_mask(m) for m in d.get("masks", [])],
                errors=list(d.get("errors", [])), densities=list(d.get("densities", [])),
                frame_mass=d.get("frame_mass"), candidate_errors=d.get("candidate_errors"),
                notes=list(d.get("notes", [])),
                tile=tuple(int(x) for x in d["tile"]) if d.get("tile") is not None else None,
                step_ranges=[StepRange.from_dict(r) for r in d["step_ranges"]] if d.get("step_ranges") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed site entry {d.get('name', '?')!r}: {exc}") from exc
        if sp.tile is not None and sp.layout is not None:
            try:
                sp.unit_grid()
            except ValueError as exc:
                raise PlanError(f"site {sp.name!r}: tile {list(sp.tile)} does not fit layout "
                                f"{sp.layout.describe()}: {exc}") from exc
        for r in sp.step_ranges or []:
            if len(r.masks) not in (1, sp.num_heads):
                raise PlanError(f"site {sp.name!r}: a step range has {len(r.masks)} masks for {sp.num_heads} heads")
        if sp.status not in ("tiled", "dense"):
            raise PlanError(f"site {sp.name!r}: status must be 'tiled' or 'dense', found {sp.status!r}")
        if sp.tiled and (sp.layout is None or len(sp.masks) not in (1, sp.num_heads)):
            raise PlanError(
                f"site {sp.name!r} is tiled but has layout={d.get('layout')} and {len(sp.masks)} masks "
                f"for {sp.num_heads} heads (expected a layout and one mask per head)"
            )
        return sp


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.6g}")


def _round_nested(x):
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, list):
        return [_round_nested(v) for v in x]
    return round(float(x), 6)


def _dumps(d: dict) -> str:
    """JSON with one key per line, but every list of numbers/strings on one line (heatmaps stay compact)."""
    compact: list[str] = []

    def squash(x):
        if isinstance(x, dict):
            return {k: squash(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(not isinstance(v, dict) for v in x):
            compact.append(json.dumps(x, separators=(",", ":")))
            return f"\x00{len(compact) - 1}\x00"
        if isinstance(x, list):
            return [squash(v) for v in x]
        return x

    text = json.dumps(squash(d), indent=1)
    for i, c in enumerate(compact):
        text = text.replace(f'"\\u0000{i}\\u0000"', c, 1)
    return text


def default_tile(layout: TokenLayout, tile_tokens: int | None = None) -> tuple[int, int]:
    """The token tile window families use at a site: about ``tile_tokens`` tokens (default 128, the
    kernels' block, or a quarter frame on small frames), a divisor of the frame (:func:`choose_tile`)."""
    from ..masks.units import choose_tile

    target = tile_tokens if tile_tokens is not None else min(128, max(1, layout.frame_tokens // 4))
    return choose_tile(layout.height, layout.width, target)


@dataclass
class Plan:
    """Per-site, per-head mask assignment for one model (see module doc)."""

    sites: list[SitePlan]
    model_class: str | None = None
    fingerprint: str | None = None
    structure: dict | None = None
    calibration: dict | None = None
    version: int = PLAN_VERSION

    # ---------------------------------------------------------------- access
    def site(self, name: str) -> SitePlan | None:
        return next((s for s in self.sites if s.name == name), None)

    @property
    def step_aware(self) -> bool:
        return any(s.step_ranges for s in self.sites if s.tiled)

    def step_range_of(self, timestep: float | None) -> int | None:
        """The step range a call with ``timestep`` falls in (all step-aware sites share the bounds), or None."""
        if timestep is None:
            return None
        for s in self.sites:
            if s.tiled and s.step_ranges:
                return step_range_index(s.step_ranges, timestep)
        return None

    def tiled_sites(self) -> list[SitePlan]:
        return [s for s in self.sites if s.tiled]

    def mean_density(self, call_timesteps: Sequence | None = None) -> float:
        """Mean head density over *all* 3D sites (a dense site counts 1.0: issue 17's measure); a step-aware
        plan's is the mean over ``call_timesteps`` (the sampler's calls) of each call's range (``None``: the
        first range's masks, i.e. the plan's default)."""
        sites = [s for s in self.sites if s.kind in TILEABLE_KINDS and s.layout is not None]
        if not sites:
            return 1.0
        per_call = []
        for t in (call_timesteps or [None]):
            vals: list[float] = []
            for s in sites:
                if not s.tiled:
                    vals += [1.0] * s.num_heads
                    continue
                dens = s.densities
                if s.step_ranges and t is not None:
                    dens = s.step_ranges[step_range_index(s.step_ranges, t)].densities
                vals += list(dens) if len(dens) == s.num_heads else list(dens) * s.num_heads
            per_call.append(sum(vals) / len(vals))
        return sum(per_call) / len(per_call)

    def masks_for(self, name: str, layout: TokenLayout) -> list[MaskSpec] | None:
        """Masks for site ``name`` at ``layout``; ``None`` when the plan leaves the site dense."""
        sp = self.site(name)
        if sp is None or not sp.tiled:
            return None
        return sp.masks_for(layout)

    # ---------------------------------------------------------------- build
    @classmethod
    def uniform(cls, sites: Iterable, mask: MaskSpec, model=None, tile_tokens: int | None = None) -> "Plan":
        """Every tileable site gets ``mask`` on all heads (no calibration; benchmarks and tests).

        Window families run on token tiles of about ``tile_tokens`` (default: :func:`default_tile`)."""
        out = []
        for s in sites:
            if s.kind in TILEABLE_KINDS and s.layout is not None and not mask.dense:
                tile = default_tile(s.layout, tile_tokens) if mask.needs_tiles else None
                sp = SitePlan(s.name, s.kind, s.layout, s.num_heads, "tiled", f"uniform {mask.name}",
                              [mask] * s.num_heads, [None] * s.num_heads, tile=tile)
                sp.densities = [masks_density([mask], s.layout, sp.unit_grid())] * s.num_heads
                out.append(sp)
            else:
                why = "uniform dense plan" if mask.dense and s.layout is not None else (s.reason or f"kind {s.kind}")
                out.append(SitePlan(s.name, s.kind, s.layout, s.num_heads, "dense", why))
        plan = cls(out, calibration={"uniform": mask.name})
        if model is not None:
            plan.model_class, plan.fingerprint = model_class_name(model), model_fingerprint(model)
            plan.structure = structure_summary(model)
        return plan

    # ---------------------------------------------------------------- checks
    def check_compatible(self, model=None, sites: Iterable | None = None) -> None:
        """Raise :class:`PlanMismatchError` listing every way the plan does not fit ``model``/``sites``.

        ``sites`` are the detected :class:`~vdit_compile.passes.detect.AttentionSite` objects.
        Class and fingerprint are checked when the plan records them (uniform plans may not).
        The frame count may differ (masks are parametric in T); H, W, text and order may not.
        """
        diffs: list[str] = []
        if model is not None and self.model_class is not None:
            found = model_class_name(model)
            if found != self.model_class:
                diffs.append(f"model class: plan was made for {self.model_class}, this model is {found}")
        if model is not None and self.fingerprint is not None:
            found = model_fingerprint(model)
            if found != self.fingerprint:
                now = structure_summary(model)
                detail = ", ".join(f"{k} {self.structure.get(k)} -> {now[k]}" for k in now
                                   if self.structure and self.structure.get(k) != now[k])
                diffs.append("structure fingerprint differs (module tree or parameter shapes changed"
                             + (f": {detail}" if detail else "") + ")")
        if sites is not None:
            diffs += self._site_differences(list(sites))
        if diffs:
            raise PlanMismatchError(diffs)

    def _site_differences(self, sites: list) -> list[str]:
        diffs = []
        detected = {s.name: s for s in sites}
        tileable = {s.name for s in sites if s.kind in TILEABLE_KINDS and s.layout is not None}
        planned = {s.name: s for s in self.sites}
        missing = [n for n, sp in planned.items() if sp.tiled and n not in detected]
        extra = sorted(tileable - set(planned))
        if missing:
            diffs.append(f"sites in the plan but not in the model: {', '.join(missing)}")
        if extra:
            diffs.append(f"tileable sites in the model but not in the plan: {', '.join(extra)}")
        for name, sp in planned.items():
            s = detected.get(name)
            if s is None or not sp.tiled:
                continue
            if s.layout is None:
                diffs.append(f"site {name}: tiled in the plan but its layout cannot be established now ({s.reason})")
                continue
            ld = layout_differences(sp.layout, s.layout)
            if ld:
                diffs.append(f"site {name}: layout differs: " + "; ".join(ld))
            if int(s.num_heads) != sp.num_heads:
                diffs.append(f"site {name}: {sp.num_heads} heads in the plan, {s.num_heads} now")
        return diffs

    # ---------------------------------------------------------------- io
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model_class": self.model_class,
            "fingerprint": self.fingerprint,
            "structure": self.structure,
            "calibration": self.calibration,
            "sites": [s.to_dict() for s in self.sites],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise PlanError(f"{source} is not a vdit-compile plan: expected format {PLAN_FORMAT!r}, found {found!r}")
        version = d.get("version")
        if version not in READABLE_VERSIONS:
            raise PlanError(
                f"{source} has plan format version {version!r}; this vdit-compile reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} "
                "(re-run `vdit-compile calibrate` to make a plan for this version)"
            )
        if not isinstance(d.get("sites"), list):
            raise PlanError(f"{source}: 'sites' must be a list, found {type(d.get('sites')).__name__}")
        return cls([SitePlan.from_dict(s) for s in d["sites"]], d.get("model_class"), d.get("fingerprint"),
                   d.get("structure"), d.get("calibration"), PLAN_VERSION)

    def save(self, path) -> Path:
        """Write the plan atomically (temporary file beside it, fsync, rename): a kill mid-write
        leaves the previous file at ``path`` intact, never a truncated one."""
        from ..atomic import atomic_write_text
        from ..validation import check_output_file

        path = check_output_file(path, "plan file")
        atomic_write_text(path, _dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"plan file {path}: expected a plan JSON file, found a directory")
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PlanError(f"plan file {path}: expected a plan JSON file (UTF-8 text), found binary data "
                            f"({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(d, source=f"plan file {path}")
