"""The candidate masks calibration scores at one site: every family in ``config.families``, deduped.

Candidates are compared as *unit masks at the calibration grid* (the site's token tile, or whole frames
when only frame-level families are searched): two specs with the same ``(N, N)`` unit mask cost the same
and err the same there, so only the first is kept. The order of :data:`FAMILY_ORDER` makes the first one
the frame-level spec when there is one (a site whose heads all pick frame-level masks needs no token
reorder at run time), then the smaller parameters (the more conservative choice at another frame count).
Masks that keep every unit are dropped; ``dense`` (always last) stands for them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..masks.base import MaskSpec, unit_masks
from ..masks.spatial import SpatialWindow
from ..masks.tile import TileMask
from ..masks.units import UnitGrid
from ..masks.window3d import Window3D

#: Families in the order ties between equal unit masks are resolved (frame-level first).
FAMILY_ORDER = ("tile", "spatial", "win3d")

#: Default parameters per family (window radii in tile units); see docs/calibration.md.
WIN3D_T = (0, 1, 2, 4)
WIN_HW = (0, 1, 2)
GLOBAL = (0, 1)


def family_candidates(family: str, num_frames: int) -> list[MaskSpec]:
    """The default search set of one family (before dedupe)."""
    T = num_frames
    if family == "tile":
        return [TileMask(g, w) for g in range(min(T, 4) + 1) for w in range(min(T - 1, 2) + 1)]
    if family == "win3d":
        return [Window3D(t, h, w, g) for g in GLOBAL for t in WIN3D_T for h in WIN_HW for w in WIN_HW]
    if family == "spatial":
        return [SpatialWindow(h, w, g) for g in GLOBAL for h in WIN_HW for w in WIN_HW]
    raise ValueError(f"no default candidates for mask family {family!r}: pass candidates=[...] explicitly "
                     f"(families with defaults: {', '.join(FAMILY_ORDER)})")


def default_family_candidates(families: Iterable[str], grid: UnitGrid) -> list[MaskSpec]:
    """Every family's default set at ``grid`` (frame-level families first), deduped, ``dense`` last."""
    fams = list(families)
    ordered = [f for f in FAMILY_ORDER if f in fams] + [f for f in fams if f not in FAMILY_ORDER]
    raw: list[MaskSpec] = []
    for f in ordered:
        raw += family_candidates(f, grid.num_frames)
    return dedupe_unit_candidates(raw, grid)


def dedupe_unit_candidates(candidates: Sequence[MaskSpec], grid: UnitGrid) -> list[MaskSpec]:
    """Drop specs whose unit mask at ``grid`` equals an earlier one's; all-kept masks become ``dense`` (last)."""
    cands = [m for m in candidates if not m.dense]
    if not cands:
        return [TileMask(dense=True)]
    um = unit_masks(cands, grid)
    seen: set[bytes] = set()
    out: list[MaskSpec] = []
    for m, u in zip(cands, um):
        if bool(u.all()):
            continue
        key = u.numpy().tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out + [TileMask(dense=True)]


def calibration_grid(layout, candidates: Sequence[MaskSpec] | None, families: Iterable[str],
                     tile_tokens: int | None) -> UnitGrid:
    """The unit grid a site is calibrated on: its default token tile when any candidate (or family) looks
    inside frames, else whole frames (cheaper, and exactly the frame tile family's statistics)."""
    from ..masks.base import known_families
    from ..plans.plan import default_tile

    if candidates is not None:
        tiles = any(m.needs_tiles and not m.dense for m in candidates)
    else:
        fam = known_families()
        tiles = any(fam[f].needs_tiles for f in families if f in fam)
    minor = layout.order == "HWT"  # frame-minor tokens: statistics are taken in unit order (reordered)
    if not tiles:
        return UnitGrid.frames(layout.num_frames, layout.height, layout.width, frame_minor=minor)
    th, tw = default_tile(layout, tile_tokens)
    return UnitGrid(layout.num_frames, layout.height, layout.width, th, tw, frame_minor=minor)


def keep_tables(candidates: Sequence[MaskSpec], grid: UnitGrid) -> torch.Tensor:
    """``(C, N+1, N+1)`` float: candidate, query group, key group kept (units, then text, always kept)."""
    N = grid.num_units
    keep = torch.ones(len(candidates), N + 1, N + 1)
    keep[:, :N, :N] = unit_masks(candidates, grid).float()
    return keep
