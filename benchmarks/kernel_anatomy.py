"""Where the forward kernel's time goes, without hardware counters: time variants that change one thing.

For one (shape, mask) the TMA (or portable) forward is timed on four visit lists built from the real one:

* ``real``       -- the plan as the op runs it;
* ``no_mask``    -- every visited block treated as fully kept (the element-mask loop left out);
* ``all_masked`` -- every visited block run through the element-mask loop;
* ``doubled``    -- every row visits each of its blocks twice (same order, same mask flags).

Differences give the cost of the boundary masking (``real - no_mask``), the extra cost per masked block, and
the fixed cost per program (prologue, Q load, descriptors, pipeline fill/drain, epilogue): with ``n`` visits
per row, ``t(n) = a + b n`` and ``t(2n) = a + 2 b n``, so ``a = 2 t(n) - t(2n)``.  The variants other than
``real`` compute wrong attention on purpose -- they exist only to be timed; nothing here is a correctness
check (the oracle tests are ``tests/test_kernel_*.py``).  Why a script: BENCHMARKS.md must say what limits the
kernel, and on a machine without profiler counters the only evidence is timing what changes.

    python benchmarks/kernel_anatomy.py --cases wan14b-81f-720p:g1w0 cogvideox5b-49f:g0w0 --out $OUT

``--launch-once`` runs each case's real forward and backward once and times nothing: the mode to run under Nsight
Compute (``ncu --clock-control none -k regex:tile_ ... python benchmarks/kernel_anatomy.py --launch-once``) where
the machine has counters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import SHAPES, bench, layout_of  # noqa: E402

from vdit_compile.masks.tile import TileMask  # noqa: E402


def variants(vl):
    """The four visit lists (see the module docstring) derived from ``vl``."""
    counts = vl.offsets[1:] - vl.offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=vl.cols.device), counts.long())
    out = {"real": vl,
           "no_mask": replace(vl, num_unmasked=counts.to(torch.int32).contiguous()),
           "all_masked": replace(vl, num_unmasked=torch.zeros_like(vl.num_unmasked))}
    # doubled: row r's unmasked part twice, then its masked part twice
    key = rows * 2 + vl.needs_mask.long()  # unmasked entries of a row sort before its masked ones
    order = torch.argsort(torch.cat([key, key]), stable=True)
    cols2 = torch.cat([vl.cols, vl.cols])[order].contiguous()
    offsets2 = (vl.offsets.long() * 2).to(torch.int32)
    out["doubled"] = replace(vl, offsets=offsets2, num_unmasked=(vl.num_unmasked * 2).contiguous(), cols=cols2,
                             needs_mask=torch.cat([vl.needs_mask, vl.needs_mask])[order])
    return out


def run_case(name: str, mask_name: str, path: str | None, rep: int) -> dict:
    from vdit_compile.kernels.configs import get_configs
    from vdit_compile.kernels.tile_attention_triton import attention_forward, forward_path
    from vdit_compile.kernels.visit import Side, tile_plan

    T, _, _, _, H, D = SHAPES[name]
    layout = layout_of(name)
    side = Side.of(layout)
    mask = TileMask.parse(mask_name)
    plan = tile_plan(side, side, mask.frame_mask(T)[None], H, "cuda")
    q, k, v = (torch.randn(1, H, layout.seq_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfgs = get_configs(D, "cuda")
    path = path or forward_path(q, k, v, cfgs, plan.max_kept())
    cfg = cfgs.tma_fwd if path == "tma" else cfgs.fwd
    real = plan.visits(cfg.block_m, cfg.block_n)
    key = (cfg.block_m, cfg.block_n, False)
    row = dict(shape=name, mask=mask_name, path=path, tile=list(vars(cfg).values()), n_rows=real.n_rows,
               visits=real.num_visits, masked_visits=int(real.needs_mask.sum()),
               visits_per_row=real.num_visits / (real.n_rows * plan.num_patterns))
    try:  # the plan is the process-wide cached one: the wrong lists must never outlive the timing
        for label, vl in variants(real).items():
            plan._lists[key] = vl
            row[f"{label}_ms"] = bench(lambda: attention_forward(q, k, v, plan, D ** -0.5, cfgs, path=path), rep=rep)
    finally:
        plan._lists[key] = real
    n = row["visits_per_row"]
    t1, t2 = row["real_ms"], row["doubled_ms"]
    row["fixed_share"] = (2 * t1 - t2) / t1  # a / t(n): share of the time that does not grow with the row length
    row["fixed_in_visits"] = (2 * t1 - t2) / ((t2 - t1) / n) if t2 > t1 else None  # a / b
    row["mask_share"] = (t1 - row["no_mask_ms"]) / t1
    if row["masked_visits"]:
        extra = (row["all_masked_ms"] - row["no_mask_ms"]) / real.num_visits  # ms per masked visit, extra
        row["masked_block_extra"] = extra / ((t2 - t1) / real.num_visits) if t2 > t1 else None  # x an unmasked visit
    return row


def launch_once(name: str, mask_name: str) -> None:
    """One forward and one backward of the op's kernels at this case (for a profiler to catch)."""
    from vdit_compile.kernels.tile_attention_triton import attention_backward, attention_forward
    from vdit_compile.kernels.visit import Side, tile_plan

    T, _, _, _, H, D = SHAPES[name]
    layout = layout_of(name)
    side = Side.of(layout)
    plan = tile_plan(side, side, TileMask.parse(mask_name).frame_mask(T)[None], H, "cuda")
    q, k, v, do = (torch.randn(1, H, layout.seq_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = attention_forward(q, k, v, plan, D ** -0.5)
    attention_backward(do, None, q, k, v, out, lse, plan, D ** -0.5)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["wan14b-81f-720p:g1w0", "cogvideox5b-49f:g0w0"],
                    help="shape:mask pairs")
    ap.add_argument("--path", default=None, choices=["portable", "tma"], help="default: the automatic choice")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--launch-once", action="store_true", help="launch each case's kernels once, time nothing (for ncu)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_anatomy.py needs a CUDA GPU")
        return 2
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv)
    rows = []
    for case in args.cases:
        name, _, mask_name = case.partition(":")
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; expected one of {sorted(SHAPES)}")
        if args.launch_once:
            launch_once(name, mask_name or "g1w0")
            continue
        rows.append(run_case(name, mask_name or "g1w0", args.path, args.rep))
        print(json.dumps(rows[-1]), flush=True)
    (out / "kernel_anatomy.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
