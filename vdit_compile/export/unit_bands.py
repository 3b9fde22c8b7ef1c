"""The op's mask arguments as gather plans over units, shared by the ONNX translation and the ATen decomposition.

Every family reaches export as ``grid`` + ``masks`` (:mod:`vdit_compile.ops.args`): ``N`` units of ``U``
tokens and one ``(N, N)`` unit mask per head.  Export never forms an ``L x L`` tensor for a sparse head;
it splits each group of heads that share a unit mask (:func:`head_groups`, the one grouping both
backends use) into three exact pieces (:func:`band_plan`):

* *full rows*: text queries and the query units that keep every key unit (global frames' rows) attend to
  every key (plain attention of those rows);
* *shared keys*: text keys and the key units every other query unit keeps (global frames' columns) form
  one key block that all other rows score against without a gather;
* *band*: each remaining query unit gathers its other kept key units, padded to the largest count ``K``
  with an index whose additive bias is ``-inf`` (the frame tile family's ``2w+1`` frame band, a 3D
  window's box of tiles, a spatial window's column of tiles through time).

The two key blocks share one softmax (common row maximum, summed exponentials), so the result and its
log-sum-exp are exact.  Rows come out as ``[full rows | band rows]``; one constant gather (``inverse``)
puts them back in the model's token order, undoing the tile reorder too.  All indices are constants
of a static grid; a new family needs nothing here (its ``keep`` rule gives the unit mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..masks.units import unit_permutation
from ..ops.args import OpMasks, resolve


@dataclass(frozen=True)
class GroupBands:
    """Gather plan of one head group (see module doc); positions are token indices in the model's order."""

    heads: tuple[int, ...]
    dense: bool
    full_rows: np.ndarray  # (F,) query positions attending every key (text + full units)
    band_rows: np.ndarray  # (R, U) query positions of the other units, one row per unit
    shared_keys: np.ndarray  # (S,) key positions every band row keeps (text + shared units)
    band_keys: np.ndarray  # (R, K) key *unit* indices gathered per band row (padding: any valid unit)
    band_keep: np.ndarray  # (R, K) bool: False on padding
    inverse: np.ndarray  # (L,) position in [full rows | band rows] of each model-order row

    @property
    def band_width(self) -> int:
        return int(self.band_keys.shape[1])


@dataclass(frozen=True)
class UnitBands:
    om: OpMasks
    seq_len: int
    text_prefix: int
    text_suffix: int
    unit_keys: np.ndarray  # (N, U) model-order key positions of every unit's tokens (unit order)
    groups: tuple[GroupBands, ...]


def _static_int(x, what: str) -> int:
    if isinstance(x, torch.SymInt):
        if x.node.is_constant():
            return int(x)
        raise NotImplementedError(f"vdit.tile_attention export needs {what} to be a constant int, found {x!r}")
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise NotImplementedError(f"vdit.tile_attention export needs {what} to be a constant int, found {x!r}")
    return int(x)


def static_grid(grid: Sequence) -> tuple[int, ...]:
    """The op's ``grid`` as ints (a symbolic frame count is refused with a clear error by the caller)."""
    return tuple(_static_int(g, "grid") for g in grid)


def head_groups(unit_mask: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Heads sharing one unit mask, ``[(heads, (N, N) mask)]`` in first-seen order."""
    groups: dict[bytes, list] = {}
    for h in range(unit_mask.shape[0]):
        m = unit_mask[h]
        key = m.numpy().tobytes()
        if key not in groups:
            groups[key] = [[], m]
        groups[key][0].append(h)
    return [(tuple(heads), m) for heads, m in groups.values()]


def _unit_positions(om: OpMasks, pre: int) -> np.ndarray:
    """``(N, U)``: model-order token position of every unit's tokens, units in unit order."""
    g = om.grid
    perm = unit_permutation(g).numpy() if om.reorder else np.arange(g.num_frames * g.height * g.width)
    return (pre + perm).reshape(g.num_units, g.unit_tokens)


def _group(heads, m: torch.Tensor, units: np.ndarray, pre: int, suf: int, L: int) -> GroupBands:
    M = m.numpy()
    U = units.shape[1]
    text = np.concatenate([np.arange(pre), np.arange(L - suf, L)]).astype(np.int64)
    if M.all():
        ident = np.arange(L, dtype=np.int64)
        empty = np.zeros((0, 0), dtype=np.int64)
        return GroupBands(heads, True, ident, np.zeros((0, U), np.int64), text, empty, empty.astype(bool), ident)
    full = M.all(1)
    rest = np.flatnonzero(~full)
    shared = np.flatnonzero(M[rest].all(0))
    band_mask = M[rest].copy()
    band_mask[:, shared] = False
    K = int(band_mask.sum(1).max())
    band_keys = np.zeros((len(rest), K), dtype=np.int64)
    band_keep = np.zeros((len(rest), K), dtype=bool)
    for i, row in enumerate(band_mask):
        kept = np.flatnonzero(row)
        band_keys[i, : len(kept)] = kept
        band_keep[i, : len(kept)] = True
        if len(kept) < K:  # padding: a valid unit index (masked by -inf), the row's own last kept one or 0
            band_keys[i, len(kept):] = kept[-1] if len(kept) else 0
    full_rows = np.concatenate([np.arange(pre), units[full].reshape(-1), np.arange(L - suf, L)]).astype(np.int64)
    band_rows = units[rest].astype(np.int64)
    order = np.concatenate([full_rows, band_rows.reshape(-1)])
    inverse = np.empty(L, dtype=np.int64)
    inverse[order] = np.arange(L)
    shared_keys = np.concatenate([text, units[shared].reshape(-1)]).astype(np.int64)
    if shared_keys.size == 0 and K == 0:
        raise ValueError("vdit.tile_attention export: a query unit keeps no key at all (the mask family's rule "
                         "must keep at least the unit itself)")
    return GroupBands(heads, False, full_rows, band_rows, shared_keys, band_keys, band_keep, inverse)


def _real_tensors():
    """A context computing plain tensors even inside a trace (decompositions run under fake/proxy modes)."""
    from contextlib import ExitStack

    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    stack = ExitStack()
    stack.enter_context(disable_proxy_modes_tracing())
    stack.enter_context(unset_fake_temporarily())
    return stack


@lru_cache(maxsize=64)
def _bands(num_heads: int, seq_len: int, pre: int, suf: int, grid: tuple, masks: str) -> UnitBands:
    with _real_tensors():
        return _build(num_heads, seq_len, pre, suf, grid, masks)


def _build(num_heads: int, seq_len: int, pre: int, suf: int, grid: tuple, masks: str) -> UnitBands:
    om = resolve(num_heads, grid, masks)
    g = om.grid
    if seq_len - pre - suf != g.num_frames * g.height * g.width:
        raise ValueError(f"vdit.tile_attention export: sequence of {seq_len} tokens minus text ({pre} + {suf}) does "
                         f"not hold the grid {list(grid)[:3]}")
    units = _unit_positions(om, pre)
    groups = tuple(_group(heads, m, units, pre, suf, seq_len) for heads, m in head_groups(om.unit_mask()))
    return UnitBands(om, seq_len, pre, suf, units, groups)


def unit_bands(num_heads: int, seq_len: int, text_prefix, text_suffix, grid: Sequence, masks: str) -> UnitBands:
    """The gather plan of one op call (cached per arguments); static ints required."""
    pre, suf = _static_int(text_prefix, "text_prefix"), _static_int(text_suffix, "text_suffix")
    return _bands(int(num_heads), _static_int(seq_len, "the sequence length"), pre, suf, static_grid(grid), masks)
