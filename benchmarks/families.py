"""Window mask families on token tiles: ours (reorder included) vs cuDNN dense and FlexAttention, same mask.

Run on a CUDA GPU (JSON lines are written as they come)::

    python benchmarks/families.py --out $OUT/families.jsonl
    python benchmarks/families.py --shapes wan14b-81f-720p --masks win3d-t4h1w1 --padded
    python benchmarks/families.py --auto-pad --plain-too --budget 150

Modes (the row's ``mode``): ``unpadded`` (default: the real frame, the op's automatic unit padding switched off,
``KernelOptions(unit_pad=False)``), ``padded-by-hand`` (``--padded``), ``auto-padded`` (``--auto-pad``: the real
frame, the op pads every unit to ``unit_stride`` tokens by the rule of ``vdit_compile/kernels/padding.py``;
``--pad-max-waste`` sets its waste limit; ``--plain-too`` times the unpadded op on the same inputs too,
``ours_plain_*``, so each row compares both on one card).  ``--budget S`` keeps the run inside ``S`` seconds:
FlexAttention (compiles per mask, the slow part) is skipped once too little time is left, and shapes that
would start past the budget are skipped (rows say so); ``--flex-shapes`` limits Flex to some shapes.

For every shape of ``benchmarks/attention.py`` and every mask: the site's token tile
(``plans.default_tile``: about 128 tokens, a divisor of the frame; ``--padded`` rounds the frame up to
48 x 80 so the tile is 8 x 16 = 128 tokens, one kernel block, as the 2026-12-05 Flex figures in
../shared/gpu/README.md did), the exact density (text included), and medians of
``triton.testing.do_bench`` for: cuDNN SDPA dense; FlexAttention on the tile-ordered tokens with the
family's rule as ``mask_mod`` (BlockMask built once, not timed; the reorder not counted for Flex, which
flatters it); ours through ``torch.ops.vdit.tile_attention`` (reorder in and out included), and the
reorder alone (``reorder_ms``: q, k, v in and the output back). TFLOP/s on kept entries =
``4 H L^2 D density / t`` forward, x3.5 forward+backward.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import SHAPES, bench, fwd_bwd  # noqa: E402
from vdit_compile import TokenLayout, parse_mask  # noqa: E402
from vdit_compile.kernels.options import kernel_options  # noqa: E402
from vdit_compile.kernels.padding import unit_stride  # noqa: E402
from vdit_compile.masks import UnitGrid  # noqa: E402
from vdit_compile.ops.args import encode_masks, op_grid  # noqa: E402
from vdit_compile.ops.reorder import PaddedUnits, from_units, to_units  # noqa: E402
from vdit_compile.plans import default_tile  # noqa: E402

MASKS = ["win3d-t1h1w1", "win3d-t4h1w1", "win3d-t4h1w1-g1", "spatial-h1w1", "spatial-h0w0-g1"]
FLEX_SECONDS = 25  # a rough cost of one mask's FlexAttention (block mask, compile of forward and backward, timing)


def layout_of(name: str, padded: bool) -> TokenLayout:
    T, (hh, ww), txt, where, _, _ = SHAPES[name]
    if padded:
        hh = -(-hh // 8) * 8
    return TokenLayout(T, hh, ww, txt if where == "prefix" else 0, txt if where == "suffix" else 0)


def flex_mask_mod(spec, grid: UnitGrid, layout: TokenLayout):
    """The family's rule in unit order as index arithmetic (what FlexAttention compiles)."""
    pre, U = layout.text_prefix, grid.unit_tokens
    vend = pre + layout.video_tokens
    nh, nw = grid.tiles_h, grid.tiles_w

    class Coords:  # ``c[..., axis]`` without stacking: a stack inside a mask_mod does not lower in Inductor
        def __init__(self, t, i, j):
            self.axes = (t, i, j)

        def __getitem__(self, key):
            return self.axes[key[-1]]

    def coords(i):
        u = (i - pre) // U
        return Coords(u // (nh * nw), (u // nw) % nh, u % nw)

    def mask_mod(b, h, qi, ki):
        text = (qi < pre) | (qi >= vend) | (ki < pre) | (ki >= vend)
        return text | spec.keep(coords(qi.clamp(pre, vend - 1)), coords(ki.clamp(pre, vend - 1)), grid)

    return mask_mod


def mode_of(args) -> str:
    return "auto-padded" if args.auto_pad else "padded-by-hand" if args.padded else "unpadded"


def _options(args, pad: bool) -> dict:
    return dict(unit_pad=pad, unit_pad_max_waste=args.pad_max_waste, gather_kernel=args.gather_kernel)


def _time_ours(ours, q, k, v, do, args, pad: bool) -> dict:
    """``{fwd_ms, fwdbwd_ms}`` of the op with automatic unit padding on or off (the output of one call too)."""
    with kernel_options(**_options(args, pad)):
        res = {"out": ours(), "fwd_ms": bench(ours)}
        if not args.fwd_only:
            res["fwdbwd_ms"] = bench(fwd_bwd(ours, (q, k, v), do), warmup=10, rep=args.rep)
    return res


def run_shape(name: str, masks: list[str], args, sink, deadline: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _, _, _, _, H, D = SHAPES[name]
    layout = layout_of(name, args.padded)
    tile = default_tile(layout, args.tile_tokens)
    grid = UnitGrid(layout.num_frames, layout.height, layout.width, *tile)
    L, scale = layout.seq_len, D ** -0.5
    base = dict(shape=name, L=L, H=H, D=D, layout=layout.describe(), tile=list(tile), unit_tokens=grid.unit_tokens,
                padded=args.padded, mode=mode_of(args), gather_kernel=args.gather_kernel)
    if args.auto_pad:
        with kernel_options(**_options(args, True)):
            base["unit_stride"] = unit_stride(grid.unit_tokens)
    if time.monotonic() > deadline:
        sink(dict(base, skipped="budget spent before this shape"))
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    full = 4.0 * H * L * L * D
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sd = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        cudnn_fwd = bench(sd)
        cudnn_fb = None if args.fwd_only else bench(fwd_bwd(sd, (q, k, v), do), warmup=10, rep=args.rep)
    pre = layout.text_prefix
    if args.auto_pad and base["unit_stride"] != grid.unit_tokens:  # the padded gather in and out
        pu = PaddedUnits(grid, pre, layout.text_suffix, base["unit_stride"])
        qp = pu.to_kernel(q.detach())
        reorder = lambda: [pu.to_kernel(x) for x in (q, k, v)] + [pu.from_kernel(qp)]  # noqa: E731
    else:
        reorder = lambda: [to_units(x, pre, grid) for x in (q, k, v)] + [from_units(q, pre, grid)]  # noqa: E731
    # the reorder as the op runs it (no grad mode inside the op), with index_select and with the Triton row gather
    with torch.no_grad(), kernel_options(gather_kernel=False):
        base.update(cudnn_fwd_ms=cudnn_fwd, cudnn_fwdbwd_ms=cudnn_fb, cudnn_fwd_tflops=full / cudnn_fwd / 1e9,
                    reorder_ms=bench(reorder))
    with torch.no_grad(), kernel_options(gather_kernel=True):
        base["reorder_gather_kernel_ms"] = bench(reorder)
    flex = torch.compile(flex_attention, dynamic=False)
    for mname in masks:
        spec = parse_mask(mname)
        dens = spec.density(layout, grid)
        row = dict(base, mask=mname, density=dens)
        ours = lambda: torch.ops.vdit.tile_attention(q, k, v, layout.text_prefix, layout.text_suffix,  # noqa: E731
                                                     op_grid(layout, tile), encode_masks([spec]), scale)[0]
        try:
            res = _time_ours(ours, q, k, v, do, args, args.auto_pad)
            out = res["out"]
            row["ours_fwd_ms"] = res["fwd_ms"]
            if "fwdbwd_ms" in res:
                row["ours_fwdbwd_ms"] = res["fwdbwd_ms"]
            if args.auto_pad and args.plain_too:
                plain = _time_ours(ours, q, k, v, do, args, False)
                row["ours_plain_fwd_ms"] = plain["fwd_ms"]
                row["ours_plain_fwdbwd_ms"] = plain.get("fwdbwd_ms")
                row["ours_vs_plain_relerr"] = ((out.float() - plain["out"].float()).norm() / plain["out"].float().norm()).item()
                row["x_auto_vs_plain_fwd"] = plain["fwd_ms"] / row["ours_fwd_ms"]
                if plain.get("fwdbwd_ms"):
                    row["x_auto_vs_plain_fwdbwd"] = plain["fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["ours_error"] = type(exc).__name__ + ": " + str(exc)[:300]
            sink(row)
            continue
        flex_here = args.flex and (args.flex_shapes is None or name in args.flex_shapes)
        if flex_here and time.monotonic() + FLEX_SECONDS > deadline:
            row["flex_skipped"] = "budget"
        elif flex_here:
            try:
                bm = create_block_mask(flex_mask_mod(spec, grid, layout), None, None, L, L, device="cuda", _compile=True)
                qu, ku, vu = (to_units(x.detach(), pre, grid).requires_grad_() for x in (q, k, v))
                fx = lambda: flex(qu, ku, vu, block_mask=bm, scale=scale)  # noqa: E731
                fo = from_units(fx(), pre, grid).float()
                row["flex_fwd_ms"] = bench(fx)
                if not args.fwd_only:
                    row["flex_fwdbwd_ms"] = bench(fwd_bwd(fx, (qu, ku, vu), to_units(do, pre, grid)), warmup=10,
                                                  rep=args.rep)
                row["ours_vs_flex_relerr"] = ((out.float() - fo).norm() / fo.norm()).item()
            except Exception as exc:  # noqa: BLE001
                row["flex_error"] = repr(exc)[:300]
        kept = full * dens
        row["ours_fwd_tflops_kept"] = kept / row["ours_fwd_ms"] / 1e9
        row["kept_tflops_over_cudnn_fwd"] = row["ours_fwd_tflops_kept"] / base["cudnn_fwd_tflops"]
        row["x_vs_cudnn_fwd"] = cudnn_fwd / row["ours_fwd_ms"]
        if row.get("flex_fwd_ms"):
            row["x_vs_flex_fwd"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
        if row.get("ours_fwdbwd_ms"):
            row["ours_fwdbwd_tflops_kept"] = 3.5 * kept / row["ours_fwdbwd_ms"] / 1e9
            row["kept_tflops_over_cudnn_fwdbwd"] = row["ours_fwdbwd_tflops_kept"] / (3.5 * full / cudnn_fb / 1e9)
            if row.get("flex_fwdbwd_ms"):
                row["x_vs_flex_fwdbwd"] = row["flex_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        sink(row)
    del q, k, v, do
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--masks", nargs="*", default=MASKS)
    ap.add_argument("--padded", action="store_true", help="round H up to a multiple of 8 (tiles of 8 x 16 = 128)")
    ap.add_argument("--auto-pad", action="store_true", help="the real frame with the op's automatic unit padding")
    ap.add_argument("--pad-max-waste", type=float, default=0.125, help="KernelOptions.unit_pad_max_waste")
    ap.add_argument("--gather-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="the op's reorder through the Triton row gather (KernelOptions.gather_kernel, the default); "
                         "--no-gather-kernel: through index_select")
    ap.add_argument("--plain-too", action="store_true", help="with --auto-pad: time the unpadded op in each row too")
    ap.add_argument("--budget", type=float, default=None, help="seconds: skip Flex, then shapes, past this")
    ap.add_argument("--tile-tokens", type=int, default=None)
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--flex-shapes", nargs="*", default=None, help="run FlexAttention at these shapes only")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--rep", type=int, default=60)
    ap.add_argument("--out", default=None, help="JSONL file")
    args = ap.parse_args(argv)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    out = open(args.out, "a") if args.out else None

    def sink(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    if args.auto_pad and args.padded:
        ap.error("--auto-pad runs the real (unpadded) frame: drop --padded")
    deadline = time.monotonic() + (args.budget if args.budget is not None else float("inf"))
    for name in args.shapes:
        run_shape(name, args.masks, args, sink, deadline)


if __name__ == "__main__":
    main()
