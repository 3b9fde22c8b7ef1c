"""Tile-sparse attention benchmark: cuDNN / flash SDPA dense, FlexAttention and ours, same masks.

Run on a CUDA GPU (one call does everything; JSON lines are written as they come)::

    python benchmarks/attention.py --out $OUT            # all shapes, all masks
    python benchmarks/attention.py --tune --out $OUT     # sweep the kernels' tile table
    python benchmarks/attention.py --shapes osp-29f-720p --masks g1w0 --no-flex
    python benchmarks/attention.py --paths portable tma tma-ws --shapes wan14b-81f-720p --no-flex

Timings: ``triton.testing.do_bench`` medians (ms).  TFLOP/s on kept entries:
``4 * H * L^2 * D * density / t`` forward, and 3.5x that for forward+backward (the usual
FlashAttention accounting: the backward does 2.5x the forward's matmul work).  Density is
the exact kept fraction of ``L x L`` (text rows/columns included).  FlexAttention gets the
same element mask (a segment-table ``mask_mod``), its BlockMask built once (timed
separately, first build includes its compile) with ``_compile=True``.  "ours" goes through
``torch.ops.vdit.tile_attention`` (the path a rewritten model takes); our mask build is the
cached visit-list build (forward lists; ``build_bwd_ms`` adds the two backward lists).
``--paths`` times ours once per forward path (``portable``, ``tma``, ``tma-ws``: TMA with the
warp-specialised loop), one row each (``path``), against the same cuDNN/Flex numbers; without it
the automatic path runs and the row says which (``auto:tma`` / ``auto:portable``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdit_compile import TileMask, TokenLayout  # noqa: E402
from vdit_compile.masks.tile import mask_density  # noqa: E402
from vdit_compile.ops.args import op_grid  # noqa: E402

# name: (frames, (height, width) per frame, text tokens, where, heads, head dim)
SHAPES = {
    "osp-29f-720p": (8, (45, 80), 0, None, 24, 96),
    "osp-93f-720p": (24, (45, 80), 0, None, 24, 96),
    "cogvideox5b-49f": (13, (30, 45), 226, "prefix", 48, 64),
    "wan14b-81f-720p": (21, (45, 80), 0, None, 40, 128),
    "hunyuan-129f-720p": (33, (45, 80), 256, "suffix", 24, 128),
}
MASKS = ["dense", "g0w0", "g1w0", "g2w0", "g1w1"]


def layout_of(name: str) -> TokenLayout:
    T, (hh, ww), txt, where, _, _ = SHAPES[name]
    return TokenLayout(T, hh, ww, txt if where == "prefix" else 0, txt if where == "suffix" else 0)


def bench(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def fwd_bwd(fn, inputs, dout):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, dout)
    return run


def time_build(layout: TokenLayout, mask: TileMask, heads: int, head_dim: int, repeats: int = 5):
    """Median ms to build our visit lists from scratch: forward lists, and forward + both backward lists."""
    from vdit_compile.kernels.configs import get_configs
    from vdit_compile.kernels.visit import Side, clear_cache, tile_plan

    cfg = get_configs(head_dim, "cuda")
    side = Side.of(layout)
    fm = mask.frame_mask(layout.num_frames)[None]
    fwd, allb = [], []
    for _ in range(repeats + 1):
        clear_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan = tile_plan(side, side, fm, heads, "cuda")
        plan.visits(cfg.fwd.block_m, cfg.fwd.block_n)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        plan.visits(cfg.dq.block_m, cfg.dq.block_n)
        plan.visits(cfg.dkdv.block_m, cfg.dkdv.block_n, transposed=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        fwd.append((t1 - t0) * 1e3)
        allb.append((t2 - t0) * 1e3)
    clear_cache()
    return statistics.median(fwd[1:]), statistics.median(allb[1:])


class FlexRunner:
    """FlexAttention with the TileMask rule as plain index arithmetic (as ``flex_bwd_probe.py`` did).

    One ``mask_mod`` closure per mask (``g``, ``w`` baked in as constants), so each mask compiles
    its own kernels (hence the raised recompile limit).  The 2026-11-25 runs used a different
    ``mask_mod`` -- a lookup in a captured (T+2) x (T+2) table -- and FlexAttention ran 1.3-2.7x
    slower with it than with arithmetic for the same mask (see BENCHMARKS.md); this is the fix.
    """

    def __init__(self, layout: TokenLayout):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.layout = layout
        self.L = layout.seq_len

    def mask_mod(self, mask: TileMask):
        T, P, pre = self.layout.num_frames, self.layout.frame_tokens, self.layout.text_prefix
        vend = pre + T * P
        g, w = min(mask.global_frames, T), mask.window

        def mask_mod(b, h, qi, ki):
            text = (qi < pre) | (qi >= vend) | (ki < pre) | (ki >= vend)
            fq = (qi - pre) // P
            fk = (ki - pre) // P
            return text | ((fq - fk).abs() <= w) | (fk < g) | (fq < g)

        return mask_mod

    def block_mask(self, mask: TileMask, T: int):
        mod = self.mask_mod(mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bm = self.create_block_mask(mod, None, None, self.L, self.L, device="cuda", _compile=True)
        torch.cuda.synchronize()
        return bm, time.perf_counter() - t0


PATH_OPTIONS = {"portable": dict(path="portable", tma_ws=False), "tma": dict(path="tma", tma_ws=False),
                "tma-ws": dict(path="tma", tma_ws=True)}


@contextlib.contextmanager
def kernel_path(path: str | None):
    """Run ours on one forward path (``None``: the automatic choice) through the kernels' options."""
    from vdit_compile.kernels.options import kernel_options

    with kernel_options(**(PATH_OPTIONS[path] if path is not None else {})):
        yield


def derive(row: dict, kept: float, full_flops: float) -> None:
    """TF/s on kept entries and speed ratios against the cuDNN / Flex timings in the row."""
    row["ours_fwd_tflops_kept"] = kept / row["ours_fwd_ms"] / 1e9
    if row.get("cudnn_fwd_ms"):
        row["cudnn_fwd_tflops"] = full_flops / row["cudnn_fwd_ms"] / 1e9
        row["x_vs_cudnn_fwd"] = row["cudnn_fwd_ms"] / row["ours_fwd_ms"]
        row["tflops_kept_over_cudnn"] = row["ours_fwd_tflops_kept"] / row["cudnn_fwd_tflops"]
    if row.get("flex_fwd_ms"):
        row["flex_fwd_tflops_kept"] = kept / row["flex_fwd_ms"] / 1e9
        row["x_vs_flex_fwd"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
    if row.get("ours_fwdbwd_ms"):
        row["ours_fwdbwd_tflops_kept"] = 3.5 * kept / row["ours_fwdbwd_ms"] / 1e9
        if row.get("cudnn_fwdbwd_ms"):
            row["x_vs_cudnn_fwdbwd"] = row["cudnn_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        if row.get("flex_fwdbwd_ms"):
            row["x_vs_flex_fwdbwd"] = row["flex_fwdbwd_ms"] / row["ours_fwdbwd_ms"]


def run_shape(name: str, masks: list[str], args, sink) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdit_compile.kernels.tile_attention_triton import forward_path

    T, _, _, _, H, D = SHAPES[name]
    layout = layout_of(name)
    L = layout.seq_len
    scale = D ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    full_flops = 4.0 * H * L * L * D
    rows = []
    base = dict(shape=name, L=L, H=H, D=D, T=T, P=layout.frame_tokens)
    dense = dict(base, mask="(dense baselines)")
    for label, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                sd = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
                dense[f"{label}_fwd_ms"] = bench(sd)
                if not args.fwd_only:
                    dense[f"{label}_fwdbwd_ms"] = bench(fwd_bwd(sd, (q, k, v), do), warmup=10, rep=args.rep)
            dense[f"{label}_fwd_tflops"] = full_flops / dense[f"{label}_fwd_ms"] / 1e9
        except Exception as exc:  # noqa: BLE001 - record and go on
            dense[f"{label}_error"] = repr(exc)[:200]
    sink(dense)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref_dense = F.scaled_dot_product_attention(q, k, v, scale=scale).float()
    flex = FlexRunner(layout) if args.flex else None
    for mname in masks:
        mask = TileMask.parse(mname)
        grid = op_grid(layout)
        dens = mask_density(mask.frame_mask(T), layout)
        common = dict(base, mask=mname, density=dens, cudnn_fwd_ms=dense.get("cudnn_fwd_ms"),
                      cudnn_fwdbwd_ms=dense.get("cudnn_fwdbwd_ms"))
        common["build_ms"], common["build_bwd_ms"] = time_build(layout, mask, H, D)
        ours = lambda: torch.ops.vdit.tile_attention(q, k, v, layout.text_prefix, layout.text_suffix, grid, mask.name, scale)[0]  # noqa: E731
        fo = None
        if flex is not None:
            try:
                if mask.dense:
                    bm, common["flex_build_first_s"] = None, 0.0
                else:
                    bm, common["flex_build_first_s"] = flex.block_mask(mask, T)
                    bm, common["flex_build_again_s"] = flex.block_mask(mask, T)  # a new closure: may compile again
                fx = lambda: flex.flex(q, k, v, block_mask=bm, scale=scale)  # noqa: E731
                fo = fx().float()
                common["flex_fwd_ms"] = bench(fx)
                if not args.fwd_only:
                    common["flex_fwdbwd_ms"] = bench(fwd_bwd(fx, (q, k, v), do), warmup=10, rep=args.rep)
                del bm
            except Exception as exc:  # noqa: BLE001
                common["flex_error"] = repr(exc)[:300]
        for path in args.paths or [None]:
            row = dict(common)
            try:
                with kernel_path(path):
                    row["path"] = path or "auto:" + forward_path(q, k, v, kept=dens)
                    out = ours()
                    row["ours_fwd_ms"] = bench(ours)
                    if not args.fwd_only:
                        row["ours_fwdbwd_ms"] = bench(fwd_bwd(ours, (q, k, v), do), warmup=10, rep=args.rep)
            except Exception as exc:  # noqa: BLE001 - e.g. a path that does not compile here
                row["ours_error"] = type(exc).__name__ + ": " + str(exc)[:300]
                sink(row)
                continue
            if mask.dense:
                row["ours_vs_cudnn_relerr"] = ((out.float() - ref_dense).norm() / ref_dense.norm()).item()
            if fo is not None:
                row["ours_vs_flex_relerr"] = ((out.float() - fo).norm() / fo.norm()).item()
            derive(row, full_flops * dens, full_flops)
            sink(row)
            rows.append(row)
            del out
        del fo
    del q, k, v, do, ref_dense
    torch.cuda.empty_cache()
    return rows


def tune(names: list[str], sink, mask_name: str = "g1w0", table_path: str | None = None,
         kinds: list[str] | None = None) -> None:
    """Sweep tile shapes of the kernels at one mask per shape (results -> configs.TABLE).

    Kinds: ``fwd``, ``dkdv``, ``dq`` (portable kernels) and, on sm90+, ``fwd_tma`` / ``fwd_tma_ws`` (the TMA
    forward without / with the warp-specialised loop; only ``fwd_tma`` goes into a written table, since a
    table row cannot ask for warp specialisation: that is ``KernelOptions.tma_ws``).
    """
    from vdit_compile.kernels.configs import KernelConfigs, TileConfig, get_configs
    from vdit_compile.kernels.tile_attention_triton import attention_backward, attention_forward
    from vdit_compile.kernels.visit import Side, tile_plan

    results, bases = [], {}

    def keep(row):
        results.append(row)
        sink(row)

    # Candidates: the rows of earlier sweeps that came within ~10% of a winner (runs 3, 4, 6 in BENCHMARKS.md), plus
    # register-capped rows (fifth number = maxnreg).  Why the caps: every uncapped row sits at 255 registers, which
    # leaves 8 warps per SM; Triton 3.6's sm_90 compile report (benchmarks/compile_report.py, no device) gives the
    # capped rows below 2-4 CTAs per SM with few spills (e.g. TMA 128x64/8w/2st at 128 regs: 38/32 LDL/STL at
    # D = 128, none at D = 64; dq 64x32/4w/3st at 128: 4 CTAs, 18/18 LDL/STL at D = 64).
    fwd_cands = [(128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2, 128),
                 (128, 64, 8, 3, 128)]
    # TMA stages K/V tiles in shared memory (num_stages deep): 128x128/8w/3st does not fit at D = 128
    tma_cands = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 2, 128),
                 (128, 64, 8, 3, 128), (64, 64, 4, 4, 128)]
    dkdv_cands = [(64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3, 128), (32, 64, 4, 3, 168),
                  (64, 64, 4, 3, 168)]
    dq_cands = [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3, 128), (64, 32, 4, 3, 168),
                (64, 64, 8, 2, 128)]
    sweeps = {"fwd": fwd_cands, "dkdv": dkdv_cands, "dq": dq_cands}
    if torch.cuda.get_device_capability()[0] >= 9:
        sweeps.update(fwd_tma=tma_cands, fwd_tma_ws=tma_cands)
    if kinds:
        sweeps = {k: c for k, c in sweeps.items() if k in kinds}
    for name in names:
        T, _, _, _, H, D = SHAPES[name]
        layout = layout_of(name)
        L = layout.seq_len
        side = Side.of(layout)
        plan = tile_plan(side, side, TileMask.parse(mask_name).frame_mask(T)[None], H, "cuda")
        q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        base = bases[str(64 if D <= 64 else 96 if D <= 96 else 128)] = get_configs(D, "cuda")
        out, lse = attention_forward(q, k, v, plan, D ** -0.5, base, path="portable")
        for kind, cands in sweeps.items():
            for c in cands:
                field = "fwd_tma" if kind.startswith("fwd_tma") else kind
                cfgs = KernelConfigs(**{**base.__dict__, field: TileConfig(*c)})
                row = dict(tune=kind, shape=name, mask=mask_name, D=D, config=c)
                try:
                    if kind == "fwd":
                        fn = lambda: attention_forward(q, k, v, plan, D ** -0.5, cfgs, path="portable")  # noqa: E731
                    elif field == "fwd_tma":
                        fn = lambda: attention_forward(q, k, v, plan, D ** -0.5, cfgs, path="tma",  # noqa: E731
                                                       tma_ws=kind == "fwd_tma_ws")
                    else:
                        fn = lambda: attention_backward(do, None, q, k, v, out, lse, plan, D ** -0.5, cfgs)  # noqa: E731
                    got = fn()
                    if field == "fwd_tma":  # same numbers as the portable kernel (bf16 rounding apart)
                        row["max_abs_vs_portable"] = (got[0].float() - out.float()).abs().max().item()
                    row["ms"] = bench(fn, warmup=10, rep=60)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    row["error"] = type(exc).__name__ + ": " + str(exc)[:120]
                keep(row)
        if D == 96 and not kinds:  # split 64 + 32 (the default) vs one 128-wide part with masked loads
            for mode in ("split", "pad"):
                for kind in ("fwd", "bwd"):
                    row = dict(tune=f"d_mode_{kind}", shape=name, mask=mask_name, D=D, mode=mode)
                    try:
                        if kind == "fwd":
                            fn = lambda: attention_forward(q, k, v, plan, D ** -0.5, base, d_mode=mode, path="portable")  # noqa: E731
                        else:
                            fn = lambda: attention_backward(do, None, q, k, v, out, lse, plan, D ** -0.5, base, d_mode=mode)  # noqa: E731
                        fn()
                        row["ms"] = bench(fn, warmup=10, rep=60)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = type(exc).__name__ + ": " + str(exc)[:120]
                    keep(row)
        del q, k, v, do, out, lse
        torch.cuda.empty_cache()
    table = {}
    for r in results:
        if "ms" in r:
            best = min((x for x in results if x["tune"] == r["tune"] and x["shape"] == r["shape"] and "ms" in x), key=lambda x: x["ms"])
            if best is r:
                print(f"BEST {r['tune']:6s} {r['shape']:18s} D={r['D']} {r.get('config') or r.get('mode')} {r['ms']:.3f} ms", flush=True)
                if r["tune"] in ("fwd", "fwd_tma", "dkdv", "dq"):
                    bucket = 64 if r["D"] <= 64 else 96 if r["D"] <= 96 else 128
                    table.setdefault(str(bucket), {})[r["tune"]] = list(r["config"])
    if table_path:  # kernels not swept here keep the current row (a table row needs fwd, dkdv and dq)
        full = {b: {**{f: list(vars(getattr(bases[b], f)).values()) for f in ("fwd", "dkdv", "dq")}, **t}
                for b, t in table.items()}
        Path(table_path).write_text(json.dumps(full, indent=1))
        print("tile table ->", table_path, json.dumps(full), flush=True)


def print_table(rows: list[dict]) -> None:
    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    hdr = ("shape", "mask", "path", "dens", "cuDNN", "flex", "ours", "xcuDNN", "xflex", "TF/s", "%cuDNN",
           "| fb cuDNN", "fb flex", "fb ours", "fb xflex", "build")
    print(" ".join(f"{h:>10}" for h in hdr))
    for r in rows:
        vals = (r["shape"][:10], r["mask"], r.get("path", "-"), f(r.get("density"), 3), f(r.get("cudnn_fwd_ms")), f(r.get("flex_fwd_ms")),
                f(r.get("ours_fwd_ms")), f(r.get("x_vs_cudnn_fwd")), f(r.get("x_vs_flex_fwd")),
                f(r.get("ours_fwd_tflops_kept"), 0), f(100 * r["tflops_kept_over_cudnn"], 0) if r.get("tflops_kept_over_cudnn") else "-",
                f(r.get("cudnn_fwdbwd_ms")), f(r.get("flex_fwdbwd_ms")), f(r.get("ours_fwdbwd_ms")),
                f(r.get("x_vs_flex_fwdbwd")), f(r.get("build_ms")))
        print(" ".join(f"{v:>10}" for v in vals))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--masks", nargs="*", default=MASKS)
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--paths", nargs="*", default=None, choices=list(PATH_OPTIONS),
                    help="time ours once per forward path, one row each (default: the automatic path)")
    ap.add_argument("--tune", action="store_true", help="sweep tile configs instead of benchmarking")
    ap.add_argument("--tune-kinds", nargs="*", default=None, choices=["fwd", "fwd_tma", "fwd_tma_ws", "dkdv", "dq"],
                    help="with --tune: only these kernels (default: all; fwd_tma* need sm90+)")
    ap.add_argument("--write-table", default=None, help="with --tune: write the best configs as a KernelOptions.tile_table json")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) for forward+backward")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU")
        return 2
    import triton

    import vdit_compile.ops  # noqa: F401 - registers torch.ops.vdit

    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.cache_size_limit = 256
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv)
    print(json.dumps(meta), flush=True)
    path = out_dir / ("attention_tune.jsonl" if args.tune else "attention.jsonl")
    fh = open(path, "a")
    fh.write(json.dumps(meta) + "\n")

    def sink(row):
        line = json.dumps(row)
        print(line, flush=True)
        fh.write(line + "\n")
        fh.flush()

    if args.tune:
        tune(args.shapes, sink, table_path=args.write_table, kinds=args.tune_kinds)
        return 0
    rows = []
    for name in args.shapes:
        rows += run_shape(name, args.masks, args, sink)
        print_table(rows)
    (out_dir / "attention.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
