"""One denoising step of an Open-Sora-Plan-1.2-shaped diffusers Wan transformer, three ways.

Dense (diffusers' default SDPA, cuDNN on H100), FlexAttention with the tile plan swapped in
for the 3D self-attention (the way ``../shared/gpu/e2e_probe.py`` did it), and
``vdit_compile.optimize(transformer, plan=TileMask(g, 0))`` (our Triton kernel behind the
custom op).  Random bf16 weights (config of e2e_probe.py: 32 layers, 24 heads x 96, ffn
9216, 512 text tokens of width 4096), B = 1, 720p latents (8 x 90 x 160 -> 45 x 80 tokens per frame).

Reports ms per step (``do_bench`` median), speed-up over dense, and the attention share of
the step: the time of the 32 self-attention calls alone (same shapes, same kernel) over the step.

    python benchmarks/step.py --out $OUT                 # 29 and 93 frames (T = 8, 24), g = 1, 2
    python benchmarks/step.py --tiny --device cpu        # smoke test of the script on CPU
    python benchmarks/step.py --fp8 --layers 8 --globals 1 --no-flex --kept-fraction 0.54 --out $OUT
    python benchmarks/step.py --frames 24 --globals --masks win3d-t4h1w1 --no-flex --out $OUT   # any mask family
    python benchmarks/step.py --frames 24 8 --globals 1 --fp8-only --no-flex --out $OUT          # dense + FP8 rows only

``--masks NAME ...`` times any registered mask (``vdit_compile.masks``: 3D windows, spatial windows across time,
``-g`` unions) applied to every head, on the token tile the op picks for the site (``plans.default_tile``); its
rows record the mask's density.  FlexAttention rows exist for the frame-tile masks (``--globals``) only.

``--fp8`` adds two rows per mask: the tile rewrite with the rest of the step compiled by inductor
(bf16), and the same with FP8 linears (``optimize(..., fp8="on")``: torchao float8 dynamic activation
+ weight, quantisation fused by inductor); each row records its first-call (compile) seconds and the
FP8 report (linears quantised / kept).  ``--layers N`` builds the model with N of its 32 layers (same
shapes per layer) to bound inductor's compile time; the step ratios are per-layer work, so they carry
over, but the absolute step times are N/32 of the full model's.  ``--kept-fraction F`` (transformer
evaluations a caching policy keeps, measured on the embedded model by benchmarks/wholestep_quality.py)
adds the end-to-end estimate dense / (step x F) to those rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OSP_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=96, in_channels=8, out_channels=8,
                  text_dim=4096, freq_dim=256, ffn_dim=9216, num_layers=32, rope_max_seq_len=1024)
TINY_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


def timer(device: str):
    """``bench(fn, rep)``: median ms of ``rep`` timed calls after one warm-up call (CUDA events on GPU).

    Steps take seconds, so a few timed calls suffice (``do_bench`` would run each 8+ times).
    """
    def bench(fn, rep=3):
        fn()
        times = []
        for _ in range(rep):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench


class FlexSwap:
    """Route 3D self-attention SDPA calls (q and k of the video length) to compiled FlexAttention."""

    def __init__(self, L: int, P: int, T: int, g: int, device: str):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # TileMask(g, 0) as index arithmetic (own frame, first g key frames, first g query frames
        # see everything); a table lookup here made FlexAttention much slower (BENCHMARKS.md).
        g = min(g, T)

        def mask_mod(b, h, qi, ki):
            fq, fk = qi // P, ki // P
            return (fq == fk) | (fk < g) | (fq < g)

        self.bm = create_block_mask(mask_mod, None, None, L, L, device=device, _compile=device == "cuda")
        self.flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
        self.L = L
        self.orig = F.scaled_dot_product_attention

    def __call__(self, *args, **kw):
        q = kw.pop("query") if "query" in kw else args[0]
        k = kw.pop("key") if "key" in kw else args[1]
        v = kw.pop("value") if "value" in kw else args[2]
        args = args[3:] if len(args) >= 3 else ()
        if q.shape[-2] == k.shape[-2] == self.L and not args and kw.get("attn_mask") is None:
            return self.flex(q, k, v, block_mask=self.bm, scale=kw.get("scale"))
        return self.orig(q, k, v, *args, **kw)

    def __enter__(self):
        F.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.orig


def attention_ms(fn_attn, H: int, L: int, D: int, layers: int, device: str, bench) -> float:
    q, k, v = (torch.randn(1, H, L, D, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32) for _ in range(3))
    return layers * bench(lambda: fn_attn(q, k, v), rep=10 if device == "cuda" else 1)


def whole_step_rows(model, step, bench, sink, mask, dense_ms, ref, tile_out, args, **ids):
    """Rows ``tile + inductor`` and ``tile + FP8 linears`` (see the module doc); errors are recorded, not raised."""
    import vdit_compile
    from vdit_compile.wholestep import report_of

    name = mask.name
    ways = [(f"ours {name} inductor", dict(backend="inductor")), (f"ours {name} + fp8", dict(backend="inductor", fp8="on"))]
    if args.fuse_qkv:  # the same with q/k/v projections fused (OptimizeConfig.fuse_qkv), side by side
        ways.append((f"ours {name} + fp8 + fused qkv", dict(backend="inductor", fp8="on", fuse_qkv=True)))
    for way, opts in ways[1:] if args.fp8_only else ways:
        try:
            t0 = time.perf_counter()
            vdit_compile.optimize(model, plan=mask, progress=False, **opts)
            out = step().float()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = bench(step, rep=args.rep)
            row = dict(ids, way=way, step_ms=ms, speedup=dense_ms / ms, first_call_s=round(first_s, 1),
                       rel_diff_vs_dense=((out - ref).norm() / ref.norm()).item(),
                       layers=len(model.blocks))
            if tile_out is not None:
                row["rel_diff_vs_tile_eager"] = ((out - tile_out).norm() / tile_out.norm()).item()
            rep = report_of(model)
            if rep and rep["fp8"]["mode"] != "off":
                row.update(fp8_quantized=len(rep["fp8"]["quantized"]), fp8_kept=rep["fp8"]["kept"])
            if args.kept_fraction:
                row.update(kept_fraction=args.kept_fraction, e2e_speedup_estimate=dense_ms / (ms * args.kept_fraction))
            sink(row)
        except Exception as exc:  # noqa: BLE001 - record and go on
            sink(dict(ids, way=way, error=repr(exc)[:500]))
        finally:
            vdit_compile.restore(model)
            torch._dynamo.reset()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", nargs="*", type=int, default=[24, 8], help="latent frames (24 = 93 video frames, 8 = 29)")
    ap.add_argument("--globals", nargs="*", type=int, default=[1, 2], help="tile masks g (w = 0)")
    ap.add_argument("--masks", nargs="*", default=[], help="other mask names (any family), e.g. win3d-t4h1w1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny config and resolution (script smoke test)")
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--fp8", action="store_true", help="add tile + inductor (bf16) and tile + FP8 linears rows")
    ap.add_argument("--layers", type=int, default=None, help="number of transformer layers (default: the config's)")
    ap.add_argument("--fp8-only", action="store_true",
                    help="dense and tile + FP8 rows only (no eager tile or bf16 inductor row): a re-measure of the FP8 "
                         "step in about half the device time")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="with --fp8/--fp8-only: also a row with q/k/v projections fused (OptimizeConfig.fuse_qkv)")
    ap.add_argument("--rep", type=int, default=2,
                    help="timed calls per step row after one warm-up call; the row is their median (runs 2-15: 2)")
    ap.add_argument("--kept-fraction", type=float, default=None,
                    help="transformer evaluations kept by a caching policy (0-1]: adds e2e_speedup_estimate")
    args = ap.parse_args(argv)
    args.fp8 = args.fp8 or args.fp8_only

    import diffusers
    from diffusers import WanTransformer3DModel

    import vdit_compile
    from vdit_compile import TileMask
    from vdit_compile.layout import TokenLayout
    from vdit_compile.masks import parse_mask
    from vdit_compile.masks.base import masks_density
    from vdit_compile.masks.units import UnitGrid, choose_tile

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = TINY_CONFIG if args.tiny else OSP_CONFIG
    if args.layers is not None:
        cfg = dict(cfg, num_layers=args.layers)
    hh, ww = (4, 6) if args.tiny else (90, 160)
    text_len, text_dim = (8, cfg["text_dim"]) if args.tiny else (512, 4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = WanTransformer3DModel(**cfg).to(dtype).eval()
    H, D, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    bench = timer(dev)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                diffusers=diffusers.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv,
                params_billion=sum(p.numel() for p in model.parameters()) / 1e9)
    print(json.dumps(meta), flush=True)
    fh = open(out_dir / "step.jsonl", "a")
    fh.write(json.dumps(meta) + "\n")

    def sink(row):
        print(json.dumps(row), flush=True)
        fh.write(json.dumps(row) + "\n")
        fh.flush()

    for T in args.frames:
        x = torch.randn(1, cfg["in_channels"], T, hh, ww, device=dev, dtype=dtype)
        enc = torch.randn(1, text_len, text_dim, device=dev, dtype=dtype)
        t = torch.tensor([500], device=dev)
        P = (hh // 2) * (ww // 2)
        L = T * P
        kwargs = dict(hidden_states=x, encoder_hidden_states=enc, timestep=t, return_dict=False)

        def step():
            with torch.no_grad():
                return model(**kwargs)[0]

        ref = step().float()
        dense_ms = bench(step, rep=args.rep)
        attn_dense = attention_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), H, L, D, layers, dev, bench)
        sink(dict(frames=T, tokens=L, way="dense", step_ms=dense_ms, attn_ms=attn_dense, attn_share=attn_dense / dense_ms))
        th, tw = choose_tile(hh // 2, ww // 2, min(128, max(1, P // 4)))   # plans.default_tile's rule
        masks = [TileMask(g, 0) for g in args.globals] + [parse_mask(m) for m in args.masks]
        for mask in masks:
            g = getattr(mask, "g", None)
            is_tile = isinstance(mask, TileMask)
            unit_grid = UnitGrid(T, hh // 2, ww // 2, *((hh // 2, ww // 2) if is_tile else (th, tw)))
            density = masks_density([mask], TokenLayout(T, hh // 2, ww // 2), unit_grid)
            if args.flex and is_tile:
                try:
                    with FlexSwap(L, P, T, g, dev) as fs:
                        flex_out = step().float()
                        ms = bench(step, rep=args.rep)
                        attn = attention_ms(lambda q, k, v: fs.flex(q, k, v, block_mask=fs.bm), H, L, D, layers, dev, bench)
                    sink(dict(frames=T, tokens=L, way=f"flex g{g}", step_ms=ms, speedup=dense_ms / ms, attn_ms=attn,
                              attn_share=attn / ms))
                except Exception as exc:  # noqa: BLE001 - record and go on
                    sink(dict(frames=T, way=f"flex g{g}", error=repr(exc)[:300]))
                    flex_out = None
            ours_out = None  # --fp8-only: no eager tile row (the FP8 rows then skip their comparison with it)
            if not args.fp8_only:
                vdit_compile.optimize(model, plan=mask, backend="eager", progress=False)
                try:
                    ours_out = step().float()
                    sites = [s for s in vdit_compile.sites_of(model) if s.tileable]
                    ms = bench(step, rep=args.rep)
                    grid = [T, hh // 2, ww // 2, *((hh // 2, ww // 2) if is_tile else (th, tw))]
                    attn = attention_ms(lambda q, k, v: torch.ops.vdit.tile_attention(q, k, v, 0, 0, grid, mask.name, D ** -0.5)[0],
                                        H, L, D, layers, dev, bench)
                    row = dict(frames=T, tokens=L, way=f"ours {mask.name}", step_ms=ms, speedup=dense_ms / ms, attn_ms=attn,
                               attn_share=attn / ms, tiled_sites=len(sites), density=density, tile=grid[3:5],
                               rel_diff_vs_dense=((ours_out - ref).norm() / ref.norm()).item())
                    if args.flex and is_tile and flex_out is not None:
                        row["rel_diff_vs_flex"] = ((ours_out - flex_out).norm() / flex_out.norm()).item()
                    sink(row)
                finally:
                    vdit_compile.restore(model)
                    # Each optimize() compiles the transformer's forward again; drop Dynamo's caches so a
                    # later frame count is not refused by the recompile limit (on the 2026-11-25 H100 run
                    # the third optimize() tiled 0 sites and ran dense; this reset was added after it).
                    torch._dynamo.reset()
            if args.fp8:
                whole_step_rows(model, step, bench, sink, mask, dense_ms, ref, ours_out, args, frames=T, tokens=L)
        del x, enc
        if dev == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
