"""Extra memory of one block-mass observation after its kernel, measured on the CPU (no GPU needed).

Why: issue 19 asks for an observation's extra peak memory <= 10% of a dense SDPA call's working set; on an H200
the Wan-14B shape measured 318 MiB of 2,953 MiB (10.8%, BENCHMARKS.md run 12), and all of it is the torch work
after the kernel (segment -> group folding, candidate scoring, the returned group mass), which runs the same ops on
any device.  This runs ``SiteCalibrator._mass_pass`` at a benchmark shape with the kernel replaced by a tensor of
its output's shape, and polls the process's resident memory from a thread (0.2 ms period) while it runs: large
tensors are mapped and unmapped one by one, so the polled peak over the resident size before the call is the
pass's extra memory, the kernel's output included.

    PYTHONPATH=$PWD python benchmarks/calibration_memory.py --shape wan14b-81f-720p --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import torch
from calibration import ALL, SHAPES  # benchmarks/ is the script's directory


def polled_peak_mib(fn, period: float = 0.0002) -> float:
    """Peak resident memory above the level before ``fn()`` (MiB), sampled from a thread while ``fn`` runs."""
    import psutil

    proc = psutil.Process(os.getpid())
    gc.collect()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(period)

    th = threading.Thread(target=poll)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    del out
    return (peak[0] - base) / 2**20


def main(argv=None) -> int:
    import vdit_compile.kernels.block_stats_triton as bst
    from vdit_compile.calibration.collector import SiteCalibrator, _drop_tables, _mass_tables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="wan14b-81f-720p", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    layout, H, D = SHAPES[args.shape]
    cal = SiteCalibrator(args.shape, layout, H, families=ALL, method="mass")
    L = layout.seq_len
    q = torch.empty(1, dtype=torch.bfloat16).expand(1, H, L, D)  # shape only: the kernel is replaced
    t = _mass_tables(cal.grid, layout.text_prefix, layout.text_suffix, L, q.device)
    out = torch.rand(1, H, len(t.starts), len(t.starts))
    real = bst.block_mass
    bst.block_mass = lambda *a, **kw: out.clone()
    try:
        _drop_tables(tuple(cal.candidates), cal.grid, q.device)  # cached across calls, as on the GPU
        peaks = [polled_peak_mib(lambda: cal._mass_pass(q, q, layout, D ** -0.5)) for _ in range(args.repeats)]
    finally:
        bst.block_mass = real
    sdpa_inputs = 3 * H * L * D * 2 / 2**20
    print(f"{args.shape}: {len(t.starts)} segments, {cal.grid.num_units + 1} groups, {len(cal.candidates)} candidates; "
          f"kernel output {out.numel() * 4 / 2**20:.0f} MiB; extra peak per call (polled) "
          + ", ".join(f"{p:.0f}" for p in peaks) + f" MiB (bf16 q, k, v alone: {sdpa_inputs:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
