"""The mask-family interface: one frozen spec object per head that every consumer takes.

A family is a frozen dataclass subclassing :class:`MaskSpec`, in a file of its own, registered with
:func:`register_family`. It gives:

* ``name`` / ``parse``: its serialised form (plans, the op's ``masks`` argument, the CLI);
* :meth:`MaskSpec.keep`: the rule, vectorised over unit coordinates ``(frame, tile row, tile column)``
  of query and key units; it is the whole definition of the family. From it come
  :meth:`MaskSpec.unit_mask` (what the op, the kernels, export and parallel paths consume) and
  :meth:`MaskSpec.element_mask` (the token-level oracle for tests, computed from token coordinates);
* ``needs_tiles``: whether the rule looks inside a frame (a frame-level family runs on whole-frame
  units and needs no token reorder);
* parametric in ``T``, ``H`` and ``W``: the rule is stated in units, so a plan made at one frame count
  applies at another.

Text tokens are outside every family: they attend to, and are attended by, everything.
Adding a family = one file + one :func:`register_family` line; nothing else changes.
"""
from __future__ import annotations

import re
from typing import ClassVar, Sequence

import torch

from ..layout import TokenLayout
from .units import UnitGrid

_FAMILIES: dict[str, type["MaskSpec"]] = {}


class MaskSpec:
    """Base of every family's spec (subclasses are frozen dataclasses)."""

    family: ClassVar[str] = ""
    #: regular expression of the family's names; groups are parsed by :meth:`from_match`
    pattern: ClassVar[str] = ""
    #: a short description of the names, for error messages
    syntax: ClassVar[str] = ""
    needs_tiles: ClassVar[bool] = False
    dense: bool = False

    @property
    def name(self) -> str:  # pragma: no cover - every family overrides
        raise NotImplementedError

    @classmethod
    def from_match(cls, m: re.Match) -> "MaskSpec":  # pragma: no cover - every family overrides
        raise NotImplementedError

    def keep(self, q: torch.Tensor, k: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
        """Bool, broadcast over ``q[..., 3]`` and ``k[..., 3]`` unit coordinates: query unit keeps key unit."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ derived
    def unit_mask(self, grid: UnitGrid, device=None) -> torch.Tensor:
        """``(N, N)`` bool over the grid's units, in unit order."""
        c = grid.unit_coords(device)
        return self.keep(c[:, None, :], c[None, :, :], grid)

    def element_mask(self, layout: TokenLayout, grid: UnitGrid, device=None) -> torch.Tensor:
        """``(L, L)`` bool token-level oracle in the model's own token order (text rows/columns kept)."""
        L, pre, nv = layout.seq_len, layout.text_prefix, layout.video_tokens
        c = grid.token_coords(device)
        vv = self.keep(c[:, None, :], c[None, :, :], grid)
        m = torch.ones(L, L, dtype=torch.bool, device=device)
        m[pre:pre + nv, pre:pre + nv] = vv
        return m

    def density(self, layout: TokenLayout, grid: UnitGrid) -> float:
        """Kept fraction of ``L x L`` (text included) at this layout."""
        return masks_density([self], layout, grid)

    def __str__(self) -> str:
        return self.name


def register_family(cls: type[MaskSpec]) -> type[MaskSpec]:
    """Class decorator: make ``cls`` known to :func:`parse_mask` (and so to plans, the op and the CLI)."""
    if not cls.family or not cls.pattern:
        raise TypeError(f"{cls.__name__} needs a 'family' and a name 'pattern'")
    _FAMILIES[cls.family] = cls
    return cls


def known_families() -> dict[str, type[MaskSpec]]:
    return dict(_FAMILIES)


def parse_mask(name: str) -> MaskSpec:
    """The spec a mask name stands for; a clear error naming every family's syntax otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a mask name must be a string, found {type(name).__name__} {name!r}")
    for cls in _FAMILIES.values():
        m = re.fullmatch(cls.pattern, name.strip())
        if m:
            return cls.from_match(m)
    known = "; ".join(f"{c.family}: {c.syntax}" for c in _FAMILIES.values())
    raise ValueError(f"unknown mask {name!r}: known families are {known}")


def as_spec(mask) -> MaskSpec:
    """A spec from a spec or a name."""
    return mask if isinstance(mask, MaskSpec) else parse_mask(mask)


def needs_tiles(masks: Sequence[MaskSpec]) -> bool:
    return any(m.needs_tiles and not m.dense for m in masks)


def unit_masks(masks: Sequence[MaskSpec], grid: UnitGrid, device=None) -> torch.Tensor:
    """``(H, N, N)`` bool, one unit mask per head (computed once per distinct spec)."""
    cache: dict[MaskSpec, torch.Tensor] = {}
    out = []
    for m in masks:
        if m not in cache:
            cache[m] = torch.ones(grid.num_units, grid.num_units, dtype=torch.bool, device=device) if m.dense \
                else m.unit_mask(grid, device)
        out.append(cache[m])
    return torch.stack(out)


def masks_density(masks: Sequence[MaskSpec], layout: TokenLayout, grid: UnitGrid) -> float:
    """Mean over heads of the kept fraction of ``L x L``, text rows and columns included."""
    um = unit_masks(masks, grid)
    U, L = grid.unit_tokens, layout.seq_len
    text = layout.text_prefix + layout.text_suffix
    kept = um.flatten(1).sum(1).double() * U * U + (2 * text * L - text * text)
    return float((kept / (L * L)).mean())


def check_int(value, name: str, lo: int = 0) -> int:
    """A family parameter: an integer (TypeError naming the type found otherwise) of at least ``lo`` (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {lo}, found {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, found {value!r}")
    return value
