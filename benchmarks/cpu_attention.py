"""CPU benchmark: dense SDPA vs the fast CPU tile op (vdit_compile.ops.cpu_fast), forward and forward+backward.

    python benchmarks/cpu_attention.py --out cpu_attention.jsonl                  # default shapes (L >= 4k)
    python benchmarks/cpu_attention.py --shapes 16x256 --densities 0.25 --dtypes float32 --reps 5 --out x.jsonl

One JSON line per (shape, dtype, density, pass): ``dense_min_ms``, ``dense_median_ms``, ``ours_min_ms``,
``ours_median_ms``, ``speedup_min`` (dense min / ours min) and ``speedup_median``, the exact mask density
(text counted) and the environment (torch version, threads, CPU).  Dense and ours run interleaved, one
warm-up each, ``--reps`` timed runs each (load changes on a shared machine hit both alike).

"ours" calls the same functions the op's CPU path calls (:func:`fast_attention` /
:func:`fast_attention_backward`); "fwd+bwd" is one forward plus one backward with a random output
gradient.  Dense is ``F.scaled_dot_product_attention`` without a mask (torch's fused CPU flash kernel),
"fwd+bwd" through autograd.  Masks: each query frame keeps ``round(density_video * T)`` consecutive
frames (a band shifted at the clip's ends: :func:`vdit_compile.runtime.cost_model.proxy_frame_mask`),
so the density is what the row says; text rows/columns are always kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdit_compile.layout import TokenLayout
from vdit_compile.masks.tile import mask_density
from vdit_compile.ops.cpu_fast import fast_attention, fast_attention_backward
from vdit_compile.runtime.cost_model import kept_frames_for, proxy_frame_mask

#: name -> (frames, tokens per frame, text prefix, heads, head dim); sequence length >= 4096.
SHAPES = {
    "16x256": (16, 256, 0, 4, 64),  # 4096 video tokens, no text (a Wan-style self-attention)
    "13x312+226": (13, 312, 226, 4, 64),  # 4282 tokens, CogVideoX-style text prefix
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fns: dict, reps: int) -> dict:
    for f in fns.values():
        f()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def row_inputs(shape: str, dtype: torch.dtype, density: float, batch: int = 1):
    """A row's ``(layout, kept frames, frame mask, q, k, v, dout, scale)``: seeded inputs, a band of the density."""
    T, P, pre, H, D = SHAPES[shape]
    layout = TokenLayout(T, P, 1, pre, 0)
    kept = kept_frames_for(layout, density)
    fm = proxy_frame_mask(T, kept)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, H, layout.seq_len, D, generator=g).to(dtype) for _ in range(3))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    return layout, kept, fm, q, k, v, dout, D ** -0.5


def add_row_arguments(ap: argparse.ArgumentParser) -> None:
    """The options naming the rows and the output (also benchmarks/cpu_bookkeeping.py's)."""
    ap.add_argument("--out", type=Path, required=True, help="JSONL file (appended to)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])


def run_case(shape: str, dtype: torch.dtype, density: float, passes: str, reps: int, batch: int) -> dict:
    T, P, pre, H, D = SHAPES[shape]
    layout, kept, fm, q, k, v, dout, scale = row_inputs(shape, dtype, density, batch)
    if passes == "fwd":
        def dense():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, scale=scale)

        def ours():
            fast_attention(q, k, v, layout, fm, scale)
    else:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def dense():
            out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
            torch.autograd.grad(out, (qg, kg, vg), dout)

        def ours():
            out, lse = fast_attention(q, k, v, layout, fm, scale)
            fast_attention_backward(dout, None, q, k, v, out, lse, layout, fm, scale)
    t = _time({"dense": dense, "ours": ours}, reps)
    ms = {k: [x * 1e3 for x in v] for k, v in t.items()}
    row = {
        "shape": shape, "batch": batch, "heads": H, "head_dim": D, "frames": T, "frame_tokens": P, "text": pre,
        "seq_len": layout.seq_len, "dtype": str(dtype).removeprefix("torch."), "pass": passes,
        "target_density": density, "density": round(mask_density(fm, layout), 4), "kept_frames": kept, "reps": reps,
        "dense_min_ms": min(ms["dense"]), "dense_median_ms": statistics.median(ms["dense"]),
        "ours_min_ms": min(ms["ours"]), "ours_median_ms": statistics.median(ms["ours"]),
    }
    row["speedup_min"] = row["dense_min_ms"] / row["ours_min_ms"]
    row["speedup_median"] = row["dense_median_ms"] / row["ours_median_ms"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(ap)
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each side (>= 3)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be >= 3 (minimum and median of at least 3 runs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
           "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cases = [(s, d, p, dt) for s in args.shapes for dt in args.dtypes for d in args.densities for p in args.passes]
    try:
        from tqdm import tqdm
        cases = tqdm(cases, desc="cpu attention", unit="case")
    except ImportError:
        pass
    with args.out.open("a") as fh:
        for shape, density, passes, dt in cases:
            row = {**run_case(shape, getattr(torch, dt), density, passes, args.reps, args.batch), **env}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(f"{shape:>11} {row['dtype']:>8} {passes:>7} density {row['density']:.3f}: dense min "
                  f"{row['dense_min_ms']:8.1f} med {row['dense_median_ms']:8.1f} ms | ours min {row['ours_min_ms']:8.1f} "
                  f"med {row['ours_median_ms']:8.1f} ms | x{row['speedup_min']:.2f} (min) x{row['speedup_median']:.2f} (med)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
