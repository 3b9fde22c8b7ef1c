"""Kernel options: forward path, warp specialisation, mask lookup and tile overrides, as one config object.

The options travel with the optimised model (``OptimizeConfig.kernel``): its forward runs inside
:func:`kernel_options` (a context variable, so two models with different options in one process, or in
two threads, never see each other's), and the launcher reads :func:`current`. Benchmarks and tests use the
same context manager.

Debugging only: :func:`from_env` reads the ``VDIT_KERNEL_PATH`` (auto | portable | tma), ``VDIT_TMA_WS``,
``VDIT_MASK_GATHER`` (1 = gather lookup), ``VDIT_UNIT_PAD`` (0 = no automatic unit padding),
``VDIT_TILE_CONFIG`` and ``VDIT_TILE_TABLE`` variables ONCE, at
import, as the defaults outside any :func:`kernel_options` block. This is the package's only read of
``VDIT_*`` variables.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass, replace

PATHS = ("auto", "portable", "tma")


@dataclass(frozen=True)
class KernelOptions:
    """``path``: forward kernel (``auto`` picks TMA on sm90+ where it fits); ``tma_ws``: warp-specialise the TMA
    loop (untested experiment); ``mask_gather``: force the per-element gather mask lookup; ``tile_config``:
    ``"fwd=128,64,4,3;dkdv=...;dq=..."`` overrides every head dim; ``tile_table``: a JSON table from
    ``benchmarks/attention.py --tune --write-table``.

    ``unit_pad``: let the CUDA path pad every unit to a block multiple (:mod:`.padding`).  On by default since its
    first GPU run (H200, 2026-12-07: GPU tests passed; 1.25-2.35x the unpadded forward, 1.07-1.66x forward+backward
    on the 720p benchmark shapes, unchanged where units are already aligned): ``KernelOptions(unit_pad=False)`` or
    ``VDIT_UNIT_PAD=0`` turns it off;
    ``unit_pad_max_waste``: the largest share of pad tokens per unit that the rule accepts (``(P_pad - P) / P``);
    ``unit_pad_max_tokens``: units longer than this are never padded (their boundary blocks are few);
    ``gather_kernel``: move tokens into and out of kernel order (padded or not) with the Triton row gather
    (``kernels/gather_rows_triton.py``) instead of ``index_select`` (+ a zero fill, + a ``cat`` of the text);
    on since an H100 timed it (BENCHMARKS.md run 15: the reorder 2.4x faster, the window op's forward 6-16% and
    forward+backward 8-14% faster at the 720p shapes)."""

    path: str = "auto"
    tma_ws: bool = False
    mask_gather: bool = False
    tile_config: str | None = None
    tile_table: str | None = None
    unit_pad: bool = True
    unit_pad_max_waste: float = 0.125
    unit_pad_max_tokens: int = 1024
    gather_kernel: bool = True

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"kernel path {self.path!r}: expected one of {', '.join(PATHS)}")
        if not self.unit_pad_max_waste >= 0 or self.unit_pad_max_tokens < 0:
            raise ValueError(f"unit_pad_max_waste ({self.unit_pad_max_waste}) and unit_pad_max_tokens "
                             f"({self.unit_pad_max_tokens}) must be >= 0")

    @classmethod
    def from_env(cls, environ=None) -> "KernelOptions":
        env = os.environ if environ is None else environ
        path = env.get("VDIT_KERNEL_PATH", "").strip().lower() or "auto"
        if path not in PATHS:
            raise ValueError(f"VDIT_KERNEL_PATH={path!r}: expected one of {', '.join(PATHS)}")
        return cls(path=path, tma_ws=env.get("VDIT_TMA_WS", "0") == "1", mask_gather=env.get("VDIT_MASK_GATHER", "0") == "1",
                   tile_config=env.get("VDIT_TILE_CONFIG") or None, tile_table=env.get("VDIT_TILE_TABLE") or None,
                   unit_pad=env.get("VDIT_UNIT_PAD", "1") != "0")


_DEFAULT = KernelOptions.from_env()
_ACTIVE: ContextVar[KernelOptions | None] = ContextVar("vdit_kernel_options", default=None)


def current() -> KernelOptions:
    """The options in force: the innermost :func:`kernel_options` block's, else the import-time defaults."""
    return _ACTIVE.get() or _DEFAULT


@contextlib.contextmanager
def kernel_options(options: KernelOptions | None = None, **overrides):
    """Run a block with ``options`` (default: the current ones) updated by ``overrides``."""
    opts = replace(options or current(), **overrides) if overrides else (options or current())
    token = _ACTIVE.set(opts)
    try:
        yield opts
    finally:
        _ACTIVE.reset(token)
