"""``torch.ops.vdit.tile_attention``: the custom op every rewritten attention site calls.

Schema (one op, used by the rewrite pass, sequence parallelism and export)::

    vdit::tile_attention(Tensor q, Tensor k, Tensor v, int text_prefix, int text_suffix,
                         int[] grid, str masks, float scale) -> (Tensor out, Tensor lse)

* ``q, k, v``: ``(B, H, L, D)`` with ``L = text_prefix + T * H * W + text_suffix``, video tokens
  frame-major in the model's own order.
* ``text_prefix``, ``text_suffix``: ints; in a traced graph either may be a ``SymInt`` (models that
  trim padded text by value, e.g. Mochi, give ``q.size(-2) - fixed tokens``), so one graph serves
  every prompt length; the fake only needs ``q``'s shape, the kernels get the call's int.
* ``grid = [T, H, W, tile_h, tile_w]`` and ``masks`` (one name, or one per head, of any registered
  family; :mod:`vdit_compile.ops.args`). Families that look inside a frame run on token tiles: the
  op reorders video tokens so every tile is contiguous, computes, and puts the output back in the
  model's order (:mod:`.reorder`); frame-level families run on whole frames with no reorder.
* ``out``: ``(B, H, L, D)`` in the input dtype; ``lse``: ``(B, H, L)`` float32 (float64 for float64
  inputs) log-sum-exp of the scaled scores (sequence parallelism merges partial results with it).

In unit space every family is the same problem -- ``N`` units of ``U`` tokens and an ``(H, N, N)``
unit mask -- which the CPU reference and the Triton kernels solve unchanged. Autograd is registered
(gradients for q, k, v; the lse's gradient is honoured too) so distillation trains through it.
CPU runs :mod:`.cpu_fast` (float64: the exact gather reference); CUDA dispatches to the Triton kernel
in :mod:`vdit_compile.kernels` when it is importable (else the reference), on padded units where
``kernels/padding.py``'s rule asks for it (units whose token count is not a block multiple, e.g. 15 x 8 = 120
tokens -> a stride of 128; gathered by :class:`.reorder.PaddedUnits`; invisible outside the CUDA kernel).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..kernels.options import current as current_kernel_options
from ..kernels.options import kernel_options
from .args import OpMasks, check_inputs, encode_masks, op_grid
from .cpu_fast import fast_applies, fast_attention, fast_attention_backward
from .reference import lse_dtype, reference_tile_attention, reference_tile_attention_backward
from .reorder import PaddedUnits, from_units, to_units

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- unit-space backends
def _cpu_forward(q, k, v, layout, om: OpMasks, scale):
    """CPU: :mod:`.cpu_fast` (torch's fused attention on the kept key units) for float32/bf16/fp16, the exact
    gather reference for float64 (the tests' oracle)."""
    impl = fast_attention if fast_applies(q) else reference_tile_attention
    return impl(q, k, v, layout, om.unit_mask(), scale)


def _cpu_backward(dout, dlse, q, k, v, out, lse, layout, om: OpMasks, scale):
    impl = fast_attention_backward if fast_applies(q) else reference_tile_attention_backward
    return impl(dout, dlse, q, k, v, out, lse, layout, om.unit_mask(), scale)


def _cuda_forward_units(q, k, v, layout, om: OpMasks, scale, valid: int = 0):
    impl = _triton_impl()
    if impl is None:
        return _cpu_forward(q, k, v, layout, om, scale)
    return impl.forward(q, k, v, layout, om, scale, valid)


def _cuda_backward_units(dout, dlse, q, k, v, out, lse, layout, om: OpMasks, scale, valid: int = 0):
    impl = _triton_impl()
    if impl is None:
        return _cpu_backward(dout, dlse, q, k, v, out, lse, layout, om, scale)
    return impl.backward(dout, dlse, q, k, v, out, lse, layout, om, scale, valid)


def _cuda_padding(q, k, v, om: OpMasks, text_prefix: int, text_suffix: int) -> PaddedUnits | None:
    """The padded kernel layout of a CUDA call (``kernels/padding.py``), or ``None`` (no padding)."""
    impl = _triton_impl()
    stride = impl.unit_padding(q, k, v, om) if impl is not None else None
    return None if stride is None else PaddedUnits(om.grid, int(text_prefix), int(text_suffix), stride)


def _padded_forward(pad: PaddedUnits, q, k, v, om: OpMasks, scale):
    out, lse = _cuda_forward_units(*(pad.to_kernel(x) for x in (q, k, v)), pad.layout, om, float(scale), pad.valid)
    return pad.from_kernel(out).contiguous(), pad.from_kernel(lse).contiguous()


def _padded_backward(pad: PaddedUnits, dout, dlse, q, k, v, out, lse, om: OpMasks, scale):
    args = (pad.to_kernel(x) for x in (dout, dlse, q, k, v, out, lse))  # pad rows zero: dO = dlse = 0 there
    grads = _cuda_backward_units(*args, pad.layout, om, float(scale), pad.valid)
    return tuple(pad.from_kernel(g).contiguous() for g in grads)


# ----------------------------------------------------------------------------- model order <-> unit order
def _forward(unit_fn, q, k, v, text_prefix, text_suffix, grid, masks, scale):
    om = check_inputs(q, k, v, text_prefix, text_suffix, grid, masks)
    if unit_fn is _cuda_forward_units:
        pad = _cuda_padding(q, k, v, om, text_prefix, text_suffix)
        if pad is not None:
            return _padded_forward(pad, q, k, v, om, scale)
    pre = int(text_prefix)
    if om.reorder:
        q, k, v = (to_units(x, pre, om.grid) for x in (q, k, v))
    layout = om.unit_layout(q.shape[2], pre, int(text_suffix))
    out, lse = unit_fn(q, k, v, layout, om, float(scale))
    if om.reorder:
        out, lse = from_units(out, pre, om.grid), from_units(lse, pre, om.grid)
    return out.contiguous(), lse.contiguous()


def _backward(unit_fn, dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, grid, masks, scale):
    om = check_inputs(q, k, v, text_prefix, text_suffix, grid, masks)
    if unit_fn is _cuda_backward_units:
        pad = _cuda_padding(q, k, v, om, text_prefix, text_suffix)
        if pad is not None:
            return _padded_backward(pad, dout, dlse, q, k, v, out, lse, om, scale)
    pre = int(text_prefix)
    if om.reorder:
        dout, dlse, q, k, v, out, lse = (to_units(x, pre, om.grid) for x in (dout, dlse, q, k, v, out, lse))
    layout = om.unit_layout(q.shape[2], pre, int(text_suffix))
    grads = unit_fn(dout, dlse, q, k, v, out, lse, layout, om, float(scale))
    if om.reorder:
        grads = tuple(from_units(g, pre, om.grid) for g in grads)
    return tuple(g.contiguous() for g in grads)


# ----------------------------------------------------------------------------- the op
@torch.library.custom_op("vdit::tile_attention", mutates_args=())
def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_prefix: int,
    text_suffix: int,
    grid: Sequence[int],
    masks: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(_cpu_forward, q, k, v, text_prefix, text_suffix, grid, masks, scale)


@tile_attention.register_kernel("cuda")
def _(q, k, v, text_prefix, text_suffix, grid, masks, scale):
    return _forward(_cuda_forward_units, q, k, v, text_prefix, text_suffix, grid, masks, scale)


@tile_attention.register_fake
def _(q, k, v, text_prefix, text_suffix, grid, masks, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("vdit::tile_attention_backward", mutates_args=())
def tile_attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    text_prefix: int,
    text_suffix: int,
    grid: Sequence[int],
    masks: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (out, lse) w.r.t. (q, k, v); CPU: the gather reference's backward."""
    return _backward(_cpu_backward, dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, grid, masks, scale)


@tile_attention_backward.register_kernel("cuda")
def _(dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, grid, masks, scale):
    return _backward(_cuda_backward_units, dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, grid, masks, scale)


@tile_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, text_prefix, text_suffix, grid, masks, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (text_prefix, text_suffix, list(grid), masks, scale)
    ctx.kernel_options = current_kernel_options()


def _autograd_backward(ctx, dout, dlse):
    """The backward op under the forward's kernel options. Why: they live in a context variable, and the autograd
    engine runs CUDA backward functions on its own device thread, which would otherwise see the defaults."""
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    with kernel_options(ctx.kernel_options):
        dq, dk, dv = torch.ops.vdit.tile_attention_backward(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse,
                                                             *ctx.args)
    return dq, dk, dv, None, None, None, None, None


tile_attention.register_autograd(_autograd_backward, setup_context=_setup_context)


_TRITON = None


def _triton_impl():
    """The Triton kernel module, or ``None`` (logged once) when Triton cannot run here."""
    global _TRITON
    if _TRITON is None:
        try:
            from ..kernels import tile_attention_triton as mod  # noqa: WPS433

            _TRITON = mod if mod.available() else False
        except Exception as exc:  # pragma: no cover - depends on the machine
            log.warning("Triton tile-attention kernel unavailable (%s); using the gather reference on CUDA", exc)
            _TRITON = False
    return _TRITON or None


def tile_attention_out(q, k, v, layout, masks: Sequence, scale: float, tile: Sequence[int] | None = None) -> torch.Tensor:
    """Attention output of the op for a site ``layout``, per-head specs/names ``masks`` and a token ``tile``."""
    return torch.ops.vdit.tile_attention(q, k, v, layout.text_prefix, layout.text_suffix, op_grid(layout, tile),
                                         encode_masks(masks), float(scale))[0]
