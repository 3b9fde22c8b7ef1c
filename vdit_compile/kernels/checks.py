"""Correctness harness for the kernels: fresh inputs, poisoned outputs, dense oracle, every element.

Shared by the CPU interpreter tests, the GPU tests and the benchmark's spot check, so all of
them compare the kernel against the same independent oracle: dense attention with the
equivalent ``L x L`` boolean mask (``vdit_compile.ops.dense_masked_attention`` for square
layouts, an explicit masked softmax for rectangular ones), in float64 (CPU) or float32 (GPU),
forward (out and lse) and all three gradients (with an lse gradient term).
"""
from __future__ import annotations

import torch

from ..layout import TokenLayout
from .visit import Side, tile_plan


def token_mask(qside: Side, kside: Side, frame_mask: torch.Tensor) -> torch.Tensor:
    """``(H, Lq, Lk)`` bool element mask equivalent to a frame mask (text rows/columns kept)."""
    def frames(s: Side):
        i = torch.arange(s.length, device=frame_mask.device)
        f = (i - s.text_prefix).div(s.frame_tokens, rounding_mode="floor").clamp(0, s.num_frames - 1)
        return f, (i < s.text_prefix) | (i >= s.video_end)

    fq, tq = frames(qside)
    fk, tk = frames(kside)
    return frame_mask[:, fq][:, :, fk] | tq[None, :, None] | tk[None, None, :]


def oracle(q, k, v, qside: Side, kside: Side, frame_mask: torch.Tensor, scale: float, acc=torch.float64):
    """Dense masked attention in ``acc`` precision: ``(out, lse)``, differentiable."""
    qa, ka, va = (t.to(acc) for t in (q, k, v))
    fm = frame_mask.to(q.device).expand(q.shape[1], -1, -1)
    tok = token_mask(qside, kside, fm)
    s = (qa @ ka.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~tok[None], float("-inf")), -1)
    if qside == kside:
        layout = TokenLayout(qside.num_frames, qside.frame_tokens, 1, qside.text_prefix, qside.length - qside.video_end)
        from ..ops.reference import dense_masked_attention

        out = dense_masked_attention(qa, ka, va, layout, fm, scale)
    else:
        out = torch.softmax(s.masked_fill(~tok[None], float("-inf")), -1) @ va
    return out, lse


def check_case(
    qside: Side,
    kside: Side,
    frame_mask: torch.Tensor,
    *,
    heads: int,
    head_dim: int,
    batch: int = 1,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    scale: float | None = None,
    configs=None,
    d_mode: str = "split",
    blhd: bool = False,
    tol: tuple[float, float] = (1e-4, 1e-4),
    grad_tol: tuple[float, float] | None = None,
) -> dict:
    """Run forward + backward on fresh random inputs into NaN-poisoned buffers and compare.

    Raises ``AssertionError`` (from ``torch.testing.assert_close``: every element, NaN fails)
    on a mismatch; returns the max abs errors for the log.
    """
    from .tile_attention_triton import attention_backward, attention_forward

    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(L):
        if blhd:  # a (B, L, H, D) tensor viewed as (B, H, L, D): strided, no copy
            return torch.randn(batch, L, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(batch, heads, L, head_dim, generator=g).to(device, dtype)

    q, k, v = rnd(qside.length), rnd(kside.length), rnd(kside.length)
    dout = torch.randn(batch, heads, qside.length, head_dim, generator=g).to(device, dtype)
    dlse = torch.randn(batch, heads, qside.length, generator=g).to(device, torch.float32)
    scale = head_dim ** -0.5 if scale is None else scale
    plan = tile_plan(qside, kside, frame_mask, heads, device)
    nan = float("nan")
    out = torch.full((batch, heads, qside.length, head_dim), nan, dtype=dtype, device=device)
    lse = torch.full((batch, heads, qside.length), nan, dtype=torch.float32, device=device)
    attention_forward(q, k, v, plan, scale, configs, d_mode, out=out, lse=lse)
    grads = tuple(torch.full_like(t, nan) for t in (q, k, v))
    attention_backward(dout, dlse, q, k, v, out, lse, plan, scale, configs, d_mode, grads=grads)

    # fp64 oracle on CPU and for fp32 inputs (fp32 on the GPU could itself run on TF32), fp32 for bf16/fp16
    acc = torch.float64 if torch.device(device).type == "cpu" or dtype == torch.float32 else torch.float32
    qr, kr, vr = (t.detach().to(acc).requires_grad_() for t in (q, k, v))
    ro, rl = oracle(qr, kr, vr, qside, kside, frame_mask, scale, acc)
    rg = torch.autograd.grad((ro * dout.to(acc)).sum() + (rl * dlse.to(acc)).sum(), (qr, kr, vr))
    rtol, atol = tol
    grtol, gatol = grad_tol or tol
    torch.testing.assert_close(out.to(acc), ro.detach(), rtol=rtol, atol=atol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse.to(acc), rl.detach(), rtol=rtol, atol=atol, msg=lambda m: f"lse: {m}")
    errs = {"out": (out.to(acc) - ro).abs().max().item(), "lse": (lse.to(acc) - rl).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), grads, rg):
        scale_b = b.abs().max().item()
        torch.testing.assert_close(a.to(acc), b, rtol=grtol, atol=gatol * max(1.0, scale_b), msg=lambda m, n=name: f"{n}: {m}")
        errs[name] = (a.to(acc) - b).abs().max().item()
    return errs
