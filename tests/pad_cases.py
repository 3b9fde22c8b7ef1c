"""Automatic unit padding (``kernels/padding.py``): cases and their check, shared by the interpreter and GPU tests.

Every case runs the op's CUDA implementation (the real dispatch on a GPU; its Python entry points under
``TRITON_INTERPRET=1`` on the CPU) on fresh random inputs, checks that the padded plan was really used (a
visit plan whose units have a ``P_pad`` stride and ``P`` real tokens), and compares out, lse and the three
gradients (with an lse gradient term) with dense attention under each head's token-level mask
``spec.element_mask`` (independent of units, reorder and padding), every element.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vdit_compile import TokenLayout
from vdit_compile.masks import UnitGrid, parse_mask
from vdit_compile.ops.args import encode_masks, op_grid


@dataclass(frozen=True)
class PadCase:
    name: str
    layout: TokenLayout
    tile: tuple[int, int] | None  # None: whole-frame units
    masks: tuple[str, ...]  # one per head
    stride: int  # the P_pad the rule must choose
    options: dict = field(default_factory=dict)  # KernelOptions overrides
    batch: int = 1
    head_dim: int = 32
    interpreter_tiles: str | None = None  # a KernelOptions.tile_config for the interpreter only (fewer programs)
    #: shift q[..., 0] down and k[..., 0] up by this much: every score very negative (lse ~ -110 at 21), so a pad
    #: key's unmasked p = exp(0 - lse) would overflow (its zero K row alone does not keep it out of dQ then)
    shift: float = 0.0
    loose: float = 1.0  # tolerance factor (scores of -110 carry fp32 rounding of ~4e-5 before any attention)

    @property
    def grid(self) -> UnitGrid:
        lay = self.layout
        th, tw = self.tile or (lay.height, lay.width)
        return UnitGrid(lay.num_frames, lay.height, lay.width, th, tw, frame_minor=lay.order == "HWT")

    def op_args(self, scale: float) -> tuple:
        lay = self.layout
        return lay.text_prefix, lay.text_suffix, op_grid(lay, self.tile), encode_masks(list(self.masks)), scale


#: Small enough for the interpreter: P = 120 and 45 (neither a block multiple), text on both sides, per-head
#: masks of every family, a frame count no window or frame tile divides, frame-minor tokens, whole-frame units
#: (no reorder without padding).  The 45-token case keeps the interpreter's 16-token blocks, so whole blocks
#: of pad (never visited) occur; the others take 32-token blocks (fewer programs: the interpreter is slow).
I32 = "fwd=32,32,1,1;dkdv=32,32,1,1;dq=32,32,1,1"
CPU_CASES = [
    PadCase("15x8 tiles (120 -> 128), prefix+suffix, 4 families", TokenLayout(2, 15, 16, text_prefix=5, text_suffix=3),
            (15, 8), ("win3d-t1h0w0", "spatial-h0w0-g1", "g1w0", "win3d-t0h0w1-g1"), 128, head_dim=16,
            interpreter_tiles=I32),
    PadCase("5x9 tiles (45 -> 64), T=3, prefix+suffix, HWT", TokenLayout(3, 5, 18, 4, 2, order="HWT"), (5, 9),
            ("win3d-t2h0w0", "spatial-h0w1", "g2w1"), 64, {"unit_pad_max_waste": 1.0}, head_dim=16),
    PadCase("frame units 10x12 (120 -> 128), prefix", TokenLayout(3, 10, 12, text_prefix=6), None,
            ("g1w0", "g0w1"), 128, head_dim=16, interpreter_tiles=I32),
    PadCase("frame units, every score very negative", TokenLayout(3, 10, 12, text_suffix=2), None,
            ("g0w0", "g1w0"), 128, head_dim=16, interpreter_tiles=I32, shift=21.0, loose=10.0),
]

#: The GPU's table tiles (64/128-token blocks): the 720p tile (15 x 8 of a 45-row frame), a 15 x 9 CogVideoX-like
#: tile padded to 192 (64-multiple: 128-row query blocks straddle units), a 5 x 9 one padded to 64.
GPU_CASES = CPU_CASES + [
    PadCase("720p-like 15x8 tiles of 45x16, prefix+suffix", TokenLayout(3, 45, 16, text_prefix=7, text_suffix=9),
            (15, 8), ("win3d-t1h1w1", "spatial-h0w0-g1", "g1w0", "win3d-t1h0w0-g1"), 128, head_dim=128),
    PadCase("15x9 tiles (135 -> 192), T=5, D=64, prefix", TokenLayout(5, 30, 9, text_prefix=26), (15, 9),
            ("win3d-t1h1w1", "win3d-t2h0w0-g1", "spatial-h1w0"), 192, {"unit_pad_max_waste": 0.5}, head_dim=64),
    PadCase("5x9 tiles (45 -> 64), D=96, suffix", TokenLayout(4, 10, 18, text_suffix=40), (5, 9),
            ("win3d-t1h1w1", "spatial-h1w1-g1"), 64, {"unit_pad_max_waste": 1.0}, batch=2, head_dim=96),
]


def oracle(q, k, v, case: PadCase, scale: float, acc=torch.float64):
    """``(out, lse)`` of dense attention with each head's element mask, in ``acc``, differentiable."""
    em = torch.stack([parse_mask(n).element_mask(case.layout, case.grid, q.device) for n in case.masks])[None]
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~em, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.to(acc), lse


def _padded_plan_used(case: PadCase) -> bool:
    from vdit_compile.kernels import visit

    P = case.grid.unit_tokens
    return any(key[0].frame_tokens == case.stride and key[0].frame_valid == P for key in visit._CACHE)


def check_pad_case(case: PadCase, *, device="cpu", dtype=torch.float32, seed=0, tol=(2e-5, 2e-5),
                   grad_tol=(5e-5, 5e-5), backward=True) -> dict:
    """Run one case through the op's CUDA implementation and compare with the oracle; returns max errors."""
    import importlib

    from vdit_compile.kernels import visit
    from vdit_compile.kernels.options import kernel_options
    from vdit_compile.kernels.padding import unit_stride

    op_mod = importlib.import_module("vdit_compile.ops.tile_attention")  # the module (the package exports the op)

    H, L, D = len(case.masks), case.layout.seq_len, case.head_dim
    tol, grad_tol = tuple(x * case.loose for x in tol), tuple(x * case.loose for x in grad_tol)
    scale = D ** -0.5
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(case.batch, H, L, D, generator=g).to(device, dtype) for _ in range(4))
    dlse = torch.randn(case.batch, H, L, generator=g).to(device)
    if case.shift:
        q[..., 0] -= case.shift
        k[..., 0] += case.shift
    args = case.op_args(scale)
    visit.clear_cache()
    on_gpu = torch.device(device).type == "cuda"
    tiles = {} if on_gpu or not case.interpreter_tiles else {"tile_config": case.interpreter_tiles}
    with kernel_options(**{"unit_pad": True, **case.options}, **tiles):
        assert unit_stride(case.grid.unit_tokens) == case.stride, "the padding rule chose another stride"
        if on_gpu:  # the real dispatch, autograd included
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            out, lse = torch.ops.vdit.tile_attention(qg, kg, vg, *args)
            grads = torch.autograd.grad((out.float() * do.float()).sum() + (lse * dlse).sum(), (qg, kg, vg)) \
                if backward else None
        else:  # the interpreter: CPU tensors dispatch to the CPU kernel, so call the CUDA implementation
            assert op_mod._triton_impl() is not None, "the Triton kernels must run here (TRITON_INTERPRET=1)"
            out, lse = op_mod._forward(op_mod._cuda_forward_units, q, k, v, *args)
            grads = op_mod._backward(op_mod._cuda_backward_units, do, dlse, q, k, v, out, lse, *args) \
                if backward else None
    assert _padded_plan_used(case), f"{case.name}: no padded plan was built (stride {case.stride})"
    acc = torch.float64 if dtype == torch.float32 or torch.device(device).type == "cpu" else torch.float32
    qr, kr, vr = (t.to(acc).requires_grad_() for t in (q, k, v))
    ro, rl = oracle(qr, kr, vr, case, scale, acc)
    torch.testing.assert_close(out.to(acc), ro.detach(), rtol=tol[0], atol=tol[1], msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse.to(acc), rl.detach(), rtol=tol[0], atol=tol[1], msg=lambda m: f"lse: {m}")
    errs = {"out": (out.to(acc) - ro).abs().max().item(), "lse": (lse.to(acc) - rl).abs().max().item()}
    if backward:
        rg = torch.autograd.grad((ro * do.to(acc)).sum() + (rl * dlse.to(acc)).sum(), (qr, kr, vr))
        for name, a, b in zip(("dq", "dk", "dv"), grads, rg):
            big = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.to(acc), b, rtol=grad_tol[0], atol=grad_tol[1] * big,
                                       msg=lambda m, n=name: f"{n}: {m}")
            errs[name] = (a.to(acc) - b).abs().max().item()
    return errs
