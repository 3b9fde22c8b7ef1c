"""Automatic unit padding: when the CUDA path lays every unit out with a block-multiple stride.

Why: at 720p a latent frame is 45 x 80 (or 30 x 45) tokens, so the token tiles the window families use are
divisors like 15 x 8 = 120 tokens, never a multiple of the kernels' 64/128-token blocks.  Unit ``u`` then starts
at token ``120 u``, most blocks straddle two units, are masked element by element and do up to half their work
on skipped entries (run 9: 24-33% of cuDNN's TFLOP/s on kept entries; the same masks on a hand-padded 48 x 80
frame with 128-token tiles reached 71%, run 10).

What: the CUDA implementation of ``vdit::tile_attention`` (``ops/tile_attention.py``) gathers tokens into
*kernel order* -- ``N`` units of stride ``P_pad`` (the first ``P`` tokens of each the unit's tokens, the rest
zero), then the text prefix and the text suffix (text is one all-kept segment for the kernels, so its place
does not matter, and moving the prefix behind the video keeps every unit block-aligned) -- in one
``index_select`` (``ops/reorder.PaddedUnits``), runs the kernels with stride ``P_pad`` and ``P`` valid tokens
per unit (pad keys are masked in every boundary block, key blocks holding pad are never run unmasked, blocks
of pad alone are never visited: ``kernels/visit.py``), and gathers the real tokens back.  Pad query rows are
computed and dropped; in the backward their ``dO`` and ``dlse`` are zero, so they add nothing to ``dK, dV``.
The schema, the fake, the CPU paths and every result are unchanged (up to float rounding order).

:func:`padded_unit_tokens` is the rule; :func:`unit_stride` applies it with the options in force
(``KernelOptions.unit_pad*``, :mod:`.options`).
"""
from __future__ import annotations

from .options import KernelOptions, current

#: Block multiples the rule tries, in order of preference: 128 aligns every block of the tile table (64 or 128
#: tokens), 64 aligns every key block (the query blocks of 128 then straddle two units).
MULTIPLES = (128, 64)


def padded_unit_tokens(unit_tokens: int, max_waste: float = 0.125, max_tokens: int = 1024,
                       multiples: tuple[int, ...] = MULTIPLES) -> int:
    """The unit stride ``P_pad >= P`` for units of ``P = unit_tokens`` tokens (``P`` itself: no padding).

    * ``P`` already a multiple of the first (largest) block multiple, or longer than ``max_tokens``: no padding
      (long units have few boundary blocks, so padding would buy little and cost a gather where frame units
      need none);
    * otherwise, for each multiple ``m`` in order: ``P`` a multiple of ``m`` -> ``P``; else ``P`` rounded up to
      ``m`` if the pad share ``(P_pad - P) / P`` is at most ``max_waste``;
    * no multiple fits: ``P`` (e.g. 15 x 9 = 135 tokens: 192 would waste 42%).

    Examples at the defaults: 120 -> 128, 250 -> 256, 600 -> 640, 192 -> 192, 135 -> 135, 45 -> 45, 3600 -> 3600.
    """
    P = int(unit_tokens)
    if P < 1:
        raise ValueError(f"unit_tokens must be >= 1, found {unit_tokens}")
    if P % multiples[0] == 0 or P > max_tokens:
        return P
    for m in multiples:
        if P % m == 0:
            return P
        padded = -(-P // m) * m
        if padded - P <= max_waste * P:
            return padded
    return P


def unit_stride(unit_tokens: int, options: KernelOptions | None = None) -> int:
    """:func:`padded_unit_tokens` with the ``KernelOptions`` in force (``unit_pad=False``: always ``P``)."""
    opts = options or current()
    if not opts.unit_pad:
        return int(unit_tokens)
    return padded_unit_tokens(unit_tokens, opts.unit_pad_max_waste, opts.unit_pad_max_tokens)


__all__ = ["MULTIPLES", "padded_unit_tokens", "unit_stride"]
