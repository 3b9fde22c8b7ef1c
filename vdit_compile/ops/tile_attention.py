"""``torch.ops.vdit.tile_attention``: the custom op every rewritten attention site calls.

Schema (one op, used by the rewrite pass, sequence parallelism and export)::

    vdit::tile_attention(Tensor q, Tensor k, Tensor v, int text_prefix, int text_suffix,
                         int num_frames, int[] global_frames, int[] windows, float scale)
        -> (Tensor out, Tensor lse)

* ``q, k, v``: ``(B, H, L, D)`` with ``L = text_prefix + num_frames * P + text_suffix``.
* ``text_prefix``, ``text_suffix``: ints; in a traced graph either may be a ``SymInt`` (models that
  trim padded text by value, e.g. Mochi, give ``q.size(-2) - fixed tokens``), so one graph serves
  every prompt length; the fake only needs ``q``'s shape, the kernels get the call's int.
* ``global_frames[h], windows[h]``: head ``h``'s :class:`~vdit_compile.masks.TileMask`
  (``global_frames[h] == -1`` encodes a dense head); one pair may serve all heads.
* ``out``: ``(B, H, L, D)`` in the input dtype; ``lse``: ``(B, H, L)`` float32 (float64 for float64 inputs) log-sum-exp of
  the scaled scores (sequence parallelism merges partial results with it).

The mask travels as integers, not as a tensor, so the op stays parametric in ``T``, hashable
for the kernel's visit-list cache, and constant-foldable in export.  Autograd is registered
(gradients for q, k, v; the lse's gradient is honoured too) so distillation trains through
it.  CPU (and CUDA without Triton) run the exact gather reference; CUDA dispatches to the
Triton kernel in :mod:`vdit_compile.kernels` when it is importable.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .cpu_fast import backward_from_args as cpu_backward_from_args, forward_from_args as cpu_forward_from_args
from .reference import lse_dtype, check_inputs, reference_backward_from_args, reference_from_args

log = logging.getLogger(__name__)


@torch.library.custom_op("vdit::tile_attention", mutates_args=())
def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_prefix: int,
    text_suffix: int,
    num_frames: int,
    global_frames: Sequence[int],
    windows: Sequence[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = cpu_forward_from_args(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale)
    return out.contiguous(), lse.contiguous()


def _cuda_forward(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
    impl = _triton_impl()
    if impl is None:
        out, lse = reference_from_args(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale)
        return out.contiguous(), lse.contiguous()
    return impl.forward(q, k, v, text_prefix, text_suffix, num_frames, list(global_frames), list(windows), scale)


tile_attention.register_kernel("cuda")(_cuda_forward)


@tile_attention.register_fake
def _(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
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
    num_frames: int,
    global_frames: Sequence[int],
    windows: Sequence[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (out, lse) w.r.t. (q, k, v); CPU: :mod:`.cpu_fast` (float64: the gather reference)."""
    grads = cpu_backward_from_args(dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, num_frames, global_frames, windows, scale)
    return tuple(g.contiguous() for g in grads)


def _cuda_backward(dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
    impl = _triton_impl()
    if impl is None:
        grads = reference_backward_from_args(dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, num_frames, global_frames, windows, scale)
        return tuple(g.contiguous() for g in grads)
    return impl.backward(dout, dlse, q, k, v, out, lse, text_prefix, text_suffix, num_frames, list(global_frames), list(windows), scale)


tile_attention_backward.register_kernel("cuda")(_cuda_backward)


@tile_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (text_prefix, text_suffix, num_frames, list(global_frames), list(windows), scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.vdit.tile_attention_backward(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


tile_attention.register_autograd(_backward, setup_context=_setup_context)


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


def tile_attention_out(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale) -> torch.Tensor:
    """Convenience wrapper returning only the attention output."""
    check_inputs(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows)
    return torch.ops.vdit.tile_attention(q, k, v, text_prefix, text_suffix, num_frames, list(global_frames), list(windows), float(scale))[0]
