"""Python side of the Triton tile-sparse attention: launchers and op-facing entry points.

* :func:`attention_forward` / :func:`attention_backward` -- launch the kernels on a :class:`~.visit.TilePlan`
  (any ``(H or 1, Tq, Tk)`` unit mask, optionally a different key layout: the rectangular ring step of
  :mod:`vdit_compile.parallel.rect`).
* :func:`forward` / :func:`backward` -- the CUDA implementation of ``torch.ops.vdit.tile_attention`` in unit
  space (:class:`~vdit_compile.ops.args.OpMasks`: any mask family, units = frames or token tiles), on padded
  units where :func:`unit_padding` says so (:mod:`.padding`).

Inputs are ``(B, H, L, D)`` tensors with unit stride on ``D``; any other strides (e.g. a
``(B, L, H, D)`` tensor viewed with ``.transpose(1, 2)``) are passed to the kernel as they
are, without a copy.  Head dims 16..256; non-power-of-two dims are split into two
power-of-two parts (96 = 64 + 32), see :mod:`._fwd`.

Forward path (:func:`forward_path`): on sm90+ GPUs the forward loads through TMA descriptors
(:mod:`._fwd_tma`) when the tensors meet TMA's alignment rules, else the portable kernel runs.
``KernelOptions(path="portable")`` always takes the portable kernel, ``"tma"`` demands TMA (an error
where it cannot run; allowed under the interpreter, which emulates descriptors);
``KernelOptions.tma_ws`` warp-specialises the TMA kernel's unmasked loop (:mod:`.options`).  The backward is portable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from ..layout import TokenLayout
from .configs import KernelConfigs, get_configs
from .options import current
from .padding import unit_stride
from .visit import Side, TilePlan, tile_plan

log = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:  # Triton is optional: without it the op runs its gather reference
    import triton

    from ._bwd import bwd_preprocess_kernel, tile_dkdv_kernel, tile_dq_kernel
    from ._fwd import tile_fwd_kernel
    from ._fwd_tma import tile_fwd_tma_kernel

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    _IMPORT_ERROR = exc


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run here: Triton importable and an sm80+ GPU (or the interpreter)."""
    if triton is None:
        return False
    if interpreting():
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def head_dim_parts(head_dim: int, mode: str = "split") -> tuple[int, int]:
    """``(BD0, BD1)``: power-of-two parts the contraction is split into (``BD1 == 0``: one part).

    ``split``: 96 -> (64, 32), 80 -> (64, 16), 64 -> (64, 0): no padded work when ``D`` is a
    sum of two powers of two.  ``pad``: one part of ``next_pow2(D)`` with masked loads
    (96 -> 128), kept only to measure what padding costs.
    """
    if mode == "pad":
        return max(16, _next_pow2(head_dim)), 0
    if mode != "split":
        raise ValueError(f"head-dim mode must be 'split' or 'pad', found {mode!r}")
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    if d0 >= head_dim:
        return d0, 0
    return d0, max(16, _next_pow2(head_dim - d0))


def unsupported_reason(q, k, v) -> str | None:
    """Why the kernel cannot take these inputs (``None`` if it can)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-D (B, H, L, D) tensors, found {q.dim()}-D/{k.dim()}-D/{v.dim()}-D"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernel takes one of float16, bfloat16, float32"
    if not (16 <= q.shape[-1] <= 256) or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head dims q{q.shape[-1]} k{k.shape[-1]} v{v.shape[-1]}: the kernel takes one equal dim in 16..256"
    if q.device.type != "cuda" and not interpreting():
        return f"device {q.device}: the kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sides(plan: TilePlan):
    """The kernels' layout arguments: query side, key side, then the key side's real tokens per unit (``k_U``)."""
    qs, ks = plan.qside, plan.kside
    return (qs.text_prefix, qs.frame_tokens, qs.video_end, qs.num_segments,
            ks.text_prefix, ks.frame_tokens, ks.video_end, ks.num_segments, ks.valid_tokens)


def two_segment_blocks(plan: TilePlan, block_q: int, block_k: int) -> bool:
    """Whether every block spans at most two consecutive segments on both sides (frames at least a block long).

    Then the kernels' boundary blocks look their mask up with four scalar loads instead of one gather per
    element (``_fwd._tile_keep``).  ``KernelOptions.mask_gather`` forces the gather (to time one against the other).
    """
    if current().mask_gather:
        return False
    return plan.qside.frame_tokens >= block_q and plan.kside.frame_tokens >= block_k


def _dot_prec(dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow ``torch.get_float32_matmul_precision()``.

    Why: "highest" (torch's default) keeps exact fp32 products ("ieee", CUDA-core FMAs, ~25x slower than the
    tensor cores on an H100: measured 215 us per call of the embedded model's attention in fp32); "high" or
    "medium" let torch's own fp32 matmuls use TF32, and the kernel does the same. bf16/fp16 ignore it.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


PATHS = ("portable", "tma")


def _tma_misfit(q, k, v, cfgs: KernelConfigs) -> str | None:
    """Why the TMA forward cannot take these inputs here (``None`` if it can)."""
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no device-side tensor descriptors"
    if not interpreting():  # the interpreter emulates descriptors on any device
        cap = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
        if cap is None or cap[0] < 9:
            return f"TMA needs an sm90+ GPU, found {q.device} (capability {cap})"
    for name, t in zip("qkv", (q, k, v)):
        if t.stride(-1) != 1:
            continue  # _unit_last copies it into a fresh (aligned) tensor
        size = t.element_size()
        # TMA: 16-byte aligned global address and row stride; the (b, h) offsets must keep the base aligned
        bad = [s for n, s in zip(t.shape[:3], t.stride()[:3]) if n > 1 and (s * size) % 16]
        if t.data_ptr() % 16 or bad:
            return (f"{name}: TMA needs a 16-byte aligned base and strides, found data_ptr % 16 = "
                    f"{t.data_ptr() % 16}, strides {tuple(t.stride())} x {size} B")
    cfg = cfgs.tma_fwd
    if max(cfg.block_m, cfg.block_n) > 256:
        return f"tile {cfg.block_m}x{cfg.block_n}: a TMA box has at most 256 rows"
    return None


def forward_path(q, k, v, cfgs: KernelConfigs | None = None, kept: float = 1.0) -> str:
    """``"tma"`` or ``"portable"``: which forward kernel :func:`attention_forward` runs for these inputs.

    Automatic: TMA on a real sm90+ GPU when the tensors fit TMA's rules and the mask keeps at most the
    row's ``tma_max_kept`` share of the scores (``kept``: the largest per-head kept fraction; the uncapped
    D = 128 rows of run 4 lost on dense masks, the capped rows of run 7 do not, so every row says 1.0 now);
    never under the interpreter;
    ``KernelOptions.path`` = ``portable`` / ``tma`` overrides (``tma`` raises where it cannot run).
    """
    want = current().path
    if want == "portable":
        return "portable"
    cfgs = cfgs or get_configs(q.shape[-1], q.device)
    why = _tma_misfit(q, k, v, cfgs)
    if want == "tma":
        if why:
            raise RuntimeError(f"kernel path 'tma' was asked for (KernelOptions.path / VDIT_KERNEL_PATH=tma): {why}")
        return "tma"
    return "portable" if why or interpreting() or kept > cfgs.tma_max_kept else "tma"


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the device-side descriptors' global scratch, unless one is set.

    Why: a kernel that builds descriptors on the device asks ``triton.set_allocator``'s allocator for
    ``scratch bytes x programs`` at every launch (Triton 3.6 and 3.9 alike) and fails without one.  We
    install a torch one (caching allocator, so cheap) only where the current context has none: Triton
    keeps it in a ``ContextVar`` (per thread), so this runs per launch and never replaces a user's.
    """
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # layout changed: cannot tell, so install ours once per process
        unset = not getattr(_ensure_allocator, "done", False)
        _ensure_allocator.done = True
    if unset:
        triton.set_allocator(_torch_scratch)


def attention_forward(q, k, v, plan: TilePlan, scale: float, cfgs: KernelConfigs | None = None, d_mode: str = "split",
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None, *, path: str | None = None,
                      tma_ws: bool | None = None):
    """Launch the forward: ``(out (B,H,Lq,D) contiguous, lse (B,H,Lq) float32)``.

    ``out``/``lse`` may be given (tests pass NaN-poisoned buffers to prove every element is written).
    ``path``: ``"portable"`` / ``"tma"``, default :func:`forward_path`; ``tma_ws``: warp-specialised
    TMA loop, default ``KernelOptions.tma_ws``.
    """
    B, H, Lq, D = q.shape
    cfgs = cfgs or get_configs(D, q.device)
    if path is None:
        path = forward_path(q, k, v, cfgs, plan.max_kept())
    elif path == "tma":
        why = _tma_misfit(q, k, v, cfgs)
        if why:
            raise RuntimeError(f"attention_forward(path='tma'): {why}")
    elif path != "portable":
        raise ValueError(f"path must be one of {PATHS}, found {path!r}")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    Lk = k.shape[2]
    cfg = cfgs.tma_fwd if path == "tma" else cfgs.fwd
    vl = plan.visits(cfg.block_m, cfg.block_n)
    bd0, bd1 = head_dim_parts(D, d_mode)
    if out is None:
        out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1 or lse.shape != q.shape[:3] or not lse.is_contiguous():
        raise ValueError("attention_forward: out must be (B,H,Lq,D) with unit last stride and lse contiguous (B,H,Lq)")
    extra = {}
    if path == "tma":
        if q.is_cuda:
            _ensure_allocator()
        ws = current().tma_ws if tma_ws is None else tma_ws
        kernel, extra = tile_fwd_tma_kernel, {"WS": bool(ws)}
    else:
        kernel = tile_fwd_kernel
    kernel[(vl.n_rows, B * H)](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        plan.head_pattern, vl.row_order, vl.offsets, vl.num_unmasked, vl.num_pad_tail, vl.cols, plan.ext,
        H, Lq, Lk, vl.n_rows, *_sides(plan), scale * LOG2E,
        HEAD_D=D, BD0=bd0, BD1=bd1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PREC=_dot_prec(q.dtype), TWO_SEG=two_segment_blocks(plan, cfg.block_m, cfg.block_n), KPAD=plan.kside.padded,
        **extra, **cfg.launch(),
    )
    return out, lse


def attention_backward(dout, dlse, q, k, v, out, lse, plan: TilePlan, scale: float, cfgs: KernelConfigs | None = None,
                       d_mode: str = "split", grads: tuple | None = None):
    """Launch the backward: ``(dq, dk, dv)`` with the strides of ``q, k, v`` (or into ``grads``)."""
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cfgs = cfgs or get_configs(D, q.device)
    bd0, bd1 = head_dim_parts(D, d_mode)
    lse = lse.float().contiguous()
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
    delta = torch.empty_like(lse)
    pre_m = 64
    bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), B * H)](
        out, dout, dlse, delta, *out.stride()[:3], *dout.stride()[:3], H, Lq,
        HEAD_D=D, BD=_next_pow2(max(D, 16)), BLOCK_M=pre_m, num_warps=4,
    )
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if dq.shape != q.shape or dk.shape != k.shape or dv.shape != v.shape or min(t.stride(-1) for t in (dq, dk, dv)) != 1:
        raise ValueError("attention_backward: grads must match q, k, v shapes with unit last stride")
    common = (H, Lq, Lk)
    c = cfgs.dkdv
    vt = plan.visits(c.block_m, c.block_n, transposed=True)
    tile_dkdv_kernel[(vt.n_rows, B * H)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        plan.head_pattern, vt.row_order, vt.offsets, vt.num_unmasked, vt.cols, plan.ext,
        *common, vt.n_rows, *_sides(plan), scale * LOG2E, scale,
        HEAD_D=D, BD0=bd0, BD1=bd1, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        DOT_PREC=_dot_prec(q.dtype), TWO_SEG=two_segment_blocks(plan, c.block_m, c.block_n), KPAD=plan.kside.padded,
        **c.launch(),
    )
    c = cfgs.dq
    vq = plan.visits(c.block_m, c.block_n)
    tile_dq_kernel[(vq.n_rows, B * H)](
        q, k, v, dout, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        plan.head_pattern, vq.row_order, vq.offsets, vq.num_unmasked, vq.num_pad_tail, vq.cols, plan.ext,
        *common, vq.n_rows, *_sides(plan), scale * LOG2E, scale,
        HEAD_D=D, BD0=bd0, BD1=bd1, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        DOT_PREC=_dot_prec(q.dtype), TWO_SEG=two_segment_blocks(plan, c.block_m, c.block_n), KPAD=plan.kside.padded,
        **c.launch(),
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- op-facing API
_WARNED: set = set()


def _op_plan(q, layout: TokenLayout, om, valid: int = 0) -> TilePlan:
    """The visit lists of one call in unit space, cached by ``(Side, heads, device, grid and mask names)``.

    ``layout`` is the call's unit-space layout (``N`` units of ``U`` tokens; :class:`~vdit_compile.ops.args.OpMasks`
    made it) and ``Side`` holds the sequence length and text prefix, so models whose text length changes per
    call (trimmed by value: Mochi, HunyuanVideo 1.5, Framepack) get one cache entry per distinct length.
    ``valid``: padded units (:func:`unit_padding`): only the first ``valid`` of every ``U`` tokens are real.
    """
    side = Side.of(layout)
    if valid:
        side = replace(side, frame_valid=int(valid))
    return tile_plan(side, side, om.unit_mask, q.shape[1], q.device, key=("op",) + om.key)


def unit_padding(q, k, v, om) -> int | None:
    """The unit stride ``P_pad`` when the CUDA path pads this call's units, else ``None``.

    Only where the kernels take the inputs (the gather reference knows no padding) and the rule of
    :func:`.padding.unit_stride` (``KernelOptions.unit_pad*``) asks for a longer stride than the unit.
    """
    if unsupported_reason(q, k, v) is not None:
        return None
    P = om.grid.unit_tokens
    stride = unit_stride(P)
    return stride if stride != P else None


def _fallback(q, k, v, what: str) -> bool:
    reason = unsupported_reason(q, k, v)
    if reason and reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("tile_attention %s: %s; using the exact gather reference", what, reason)
    return reason is not None


def _no_padded_fallback(valid: int, what: str) -> None:
    if valid:
        raise RuntimeError(f"tile_attention {what}: padded units reached the gather reference (unit_padding "
                           "must only pad inputs the kernels take)")


def forward(q, k, v, layout: TokenLayout, om, scale: float, valid: int = 0):
    """CUDA implementation of ``torch.ops.vdit.tile_attention`` in unit space: ``(out, lse)``.

    ``valid``: the units of ``layout`` are padded (:func:`unit_padding`), ``valid`` real tokens each.
    """
    if _fallback(q, k, v, "forward"):
        from ..ops.reference import reference_tile_attention

        _no_padded_fallback(valid, "forward")
        out, lse = reference_tile_attention(q, k, v, layout, om.unit_mask(), scale)
        return out.contiguous(), lse.contiguous()
    return attention_forward(q, k, v, _op_plan(q, layout, om, valid), float(scale))


def backward(dout, dlse, q, k, v, out, lse, layout: TokenLayout, om, scale: float, valid: int = 0):
    """CUDA implementation of ``torch.ops.vdit.tile_attention_backward`` in unit space: ``(dq, dk, dv)``.

    Padded units (``valid``): the pad rows of ``dout`` and ``dlse`` must be zero (``ops.reorder.PaddedUnits``).
    """
    if _fallback(q, k, v, "backward"):
        from ..ops.reference import reference_tile_attention_backward

        _no_padded_fallback(valid, "backward")
        grads = reference_tile_attention_backward(dout, dlse, q, k, v, out, lse, layout, om.unit_mask(), scale)
        return tuple(g.contiguous() for g in grads)
    return attention_backward(dout, dlse, q, k, v, out, lse, _op_plan(q, layout, om, valid), float(scale))


def flops(plan: TilePlan, batch: int, head_dim: int) -> float:
    """Forward FLOPs on kept entries: ``4 * B * sum_h kept_h * D`` (two matmuls)."""
    kept = plan.kept_fraction().sum().item() * plan.qside.length * plan.kside.length
    return 4.0 * batch * kept * head_dim


__all__ = ["available", "forward", "backward", "attention_forward", "attention_backward",
           "forward_path", "head_dim_parts", "flops", "unit_padding"]
