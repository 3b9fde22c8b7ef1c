"""Token reorder between the model's frame-major order and tile (unit) order, along the sequence axis.

Only the video tokens move; text prefix and suffix stay where they are. One ``index_select`` each way
(the permutation is cached per grid and device): the cost is a copy of q, k, v and the output, which
``benchmarks/attention.py --families`` reports beside the attention time.

:class:`PaddedUnits` is the CUDA path's variant with padded units (``kernels/padding.py``): units of stride
``P_pad``, pad tokens zero, the text behind the video, in one ``index_select`` over the whole sequence (plus
a zero fill of the pad slots) each way, or (``KernelOptions.gather_kernel``, on by default on CUDA) one Triton row gather per
tensor that writes the pad rows' zeros in the same pass (``kernels/gather_rows_triton.py``); the same option
moves :func:`to_units` / :func:`from_units` with one gather over the whole sequence (no ``cat`` of the text).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..masks.units import UnitGrid, unit_permutation

_INV: dict = {}


def _inverse(grid: UnitGrid, device) -> torch.Tensor:
    key = (grid, str(device))
    inv = _INV.get(key)
    if inv is None:
        perm = unit_permutation(grid, device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        if len(_INV) > 64:
            _INV.clear()
        _INV[key] = inv
    return inv


def _apply(x: torch.Tensor, pre: int, grid: UnitGrid, index: torch.Tensor) -> torch.Tensor:
    nv = grid.num_frames * grid.height * grid.width
    dim = 2
    video = x.narrow(dim, pre, nv).index_select(dim, index)
    parts = [x.narrow(dim, 0, pre)] if pre else []
    parts.append(video)
    suf = x.shape[dim] - pre - nv
    if suf:
        parts.append(x.narrow(dim, pre + nv, suf))
    return torch.cat(parts, dim) if len(parts) > 1 else video


def _whole(x: torch.Tensor, pre: int, grid: UnitGrid, inverse: bool) -> torch.Tensor:
    """The row index of the whole sequence (text rows in place, video rows permuted), for the Triton gather."""
    key = ("whole", grid, pre, x.shape[2], inverse, str(x.device))
    idx = _INV.get(key)
    if idx is None:
        nv = grid.num_frames * grid.height * grid.width
        video = (_inverse if inverse else unit_permutation)(grid, x.device) + pre
        idx = torch.cat([torch.arange(pre, device=x.device), video,
                         torch.arange(pre + nv, x.shape[2], device=x.device)])
        if len(_INV) > 64:
            _INV.clear()
        _INV[key] = idx
    return idx


def to_units(x: torch.Tensor, text_prefix: int, grid: UnitGrid) -> torch.Tensor:
    """``(B, H, L, ...)`` in model order -> unit order (each tile's tokens contiguous)."""
    if _use_gather_kernel(x):
        from ..kernels.gather_rows_triton import gather_rows

        return gather_rows(x, _whole(x, int(text_prefix), grid, False))
    return _apply(x, int(text_prefix), grid, unit_permutation(grid, x.device))


def from_units(x: torch.Tensor, text_prefix: int, grid: UnitGrid) -> torch.Tensor:
    """Inverse of :func:`to_units`."""
    if _use_gather_kernel(x):
        from ..kernels.gather_rows_triton import gather_rows

        return gather_rows(x, _whole(x, int(text_prefix), grid, True))
    return _apply(x, int(text_prefix), grid, _inverse(grid, x.device))


_PAD_INDEX: dict = {}


@dataclass(frozen=True)
class PaddedUnits:
    """Model order <-> *kernel order* with padded units: ``[N units of stride P_pad][text prefix][text suffix]``.

    Unit ``u`` holds its ``P`` tokens (unit order, :func:`unit_permutation`) at ``u * P_pad ..``, followed by
    ``P_pad - P`` pad tokens, which :meth:`to_kernel` fills with zeros (so pad query rows carry zero ``dO`` and
    ``dlse`` in the backward).  The text prefix moves behind the video: for the kernels every text token is one
    all-kept segment wherever it sits, and with no prefix in front every unit starts on a block multiple.
    """

    grid: UnitGrid
    text_prefix: int
    text_suffix: int
    unit_stride: int  # P_pad

    def __post_init__(self):
        if self.unit_stride < self.grid.unit_tokens:
            raise ValueError(f"unit stride {self.unit_stride} < {self.grid.unit_tokens} tokens per unit")

    @property
    def valid(self) -> int:
        """Real tokens per unit (``P``)."""
        return self.grid.unit_tokens

    @property
    def layout(self) -> TokenLayout:
        """The kernels' layout: ``N`` units of ``P_pad`` tokens, all text as the suffix."""
        return TokenLayout(self.grid.num_units, self.unit_stride, 1, 0, self.text_prefix + self.text_suffix)

    @property
    def video_slots(self) -> int:
        return self.grid.num_units * self.unit_stride

    def index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gather, scatter)``: model token of every kernel slot (pad slots: token 0, zeroed afterwards), and
        the kernel slot of every model token; cached per layout and device."""
        return self._indices(device)[:2]

    def _indices(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`index` and the gather index with ``-1`` at pad slots (:func:`~..kernels.gather_rows_triton.gather_rows`)."""
        key = (self, str(device))
        hit = _PAD_INDEX.get(key)
        if hit is None:
            g, pre, P, Pp = self.grid, self.text_prefix, self.valid, self.unit_stride
            nv = g.num_frames * g.height * g.width
            perm = unit_permutation(g, "cpu").view(g.num_units, P) + pre
            video = torch.zeros(g.num_units, Pp, dtype=torch.long)
            video[:, :P] = perm
            text = torch.cat([torch.arange(pre), torch.arange(pre + nv, pre + nv + self.text_suffix)])
            gather = torch.cat([video.flatten(), text])
            slots = torch.arange(gather.numel())
            real = (slots >= self.video_slots) | (slots % Pp < P)
            scatter = torch.empty(pre + nv + self.text_suffix, dtype=torch.long)
            scatter[gather[real]] = slots[real]
            padded = torch.where(real, gather, torch.full_like(gather, -1))
            hit = (gather.to(device), scatter.to(device), padded.to(device))
            if len(_PAD_INDEX) > 64:
                _PAD_INDEX.clear()
            _PAD_INDEX[key] = hit
        return hit

    def to_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, L, ...)`` in model order -> ``(B, H, L_pad, ...)`` in kernel order, pad tokens zero."""
        if _use_gather_kernel(x):
            from ..kernels.gather_rows_triton import gather_rows

            return gather_rows(x, self._indices(x.device)[2])
        y = x.index_select(2, self.index(x.device)[0])
        pad = self.unit_stride - self.valid
        if pad:
            y.narrow(2, 0, self.video_slots).unflatten(2, (self.grid.num_units, self.unit_stride)).narrow(
                3, self.valid, pad).zero_()
        return y

    def from_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_kernel` (pad tokens dropped)."""
        if _use_gather_kernel(x):
            from ..kernels.gather_rows_triton import gather_rows

            return gather_rows(x, self._indices(x.device)[1])
        return x.index_select(2, self.index(x.device)[1])


def _use_gather_kernel(x: torch.Tensor) -> bool:
    """The Triton row gather instead of ``index_select``: ``KernelOptions.gather_kernel`` on (the default), a CUDA
    tensor (or Triton's CPU interpreter, which the kernel tests use) of three or four dimensions, and no autograd
    graph to record (the gather has no backward of its own; inside the op's forward and backward, which run
    without grad mode, it always applies; a caller that differentiates through the reorder keeps ``index_select``)."""
    from ..kernels.options import current

    return (current().gather_kernel and x.dim() in (3, 4)
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and not (x.requires_grad and torch.is_grad_enabled()))
