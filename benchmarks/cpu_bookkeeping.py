"""CPU op: what running its bookkeeping (copies, additions, gathers around the fused kernels) on one thread buys.

    python benchmarks/cpu_bookkeeping.py --out x.jsonl [--shapes 13x312+226] [--dtypes float32] [--reps 9]

Times ``fast_attention`` (+ ``fast_attention_backward`` for "fwd+bwd") with three bookkeeping modes, interleaved
in one process (rotating order; load changes on a shared machine hit all three alike):

* ``thread``: the op as shipped (:func:`vdit_compile.ops.threads.serial_bookkeeping`: one OpenMP and MKL thread
  for the calling thread only, the caller's count for the kernels);
* ``process``: the op's earlier way, ``torch.set_num_threads(1)`` around the bookkeeping (process-wide);
* ``none``: no change, the bookkeeping on every thread.

Rows as ``benchmarks/cpu_attention.py`` (same shapes, band masks of the row's density); one JSON line per row with
each mode's min and median and the ratios to ``thread``. The modes differ only on a loaded machine (a parallel
region waits for its slowest, descheduled thread), so record the load (in the rows) and compare within a row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_attention import add_row_arguments, row_inputs  # noqa: E402
from vdit_compile.masks.tile import mask_density  # noqa: E402
from vdit_compile.ops import cpu_fast, threads  # noqa: E402


@contextmanager
def _process_wide():
    """The bookkeeping as the op ran it before 2026-12-07: torch.set_num_threads, restored after."""
    n = torch.get_num_threads()

    def par(fn, *args, **kw):
        torch.set_num_threads(n)
        try:
            return fn(*args, **kw)
        finally:
            torch.set_num_threads(1)

    par.threads = n
    torch.set_num_threads(1)
    try:
        yield par
    finally:
        torch.set_num_threads(n)


@contextmanager
def _unchanged():
    def par(fn, *args, **kw):
        return fn(*args, **kw)

    par.threads = torch.get_num_threads()
    yield par


MODES = {"thread": threads.serial_bookkeeping, "process": _process_wide, "none": _unchanged}


def run_row(shape: str, dtype: torch.dtype, density: float, passes: str, reps: int) -> dict:
    layout, _, fm, q, k, v, dout, scale = row_inputs(shape, dtype, density)

    def call(mode):
        def fn():
            cpu_fast.serial_bookkeeping = MODES[mode]
            out, lse = cpu_fast.fast_attention(q, k, v, layout, fm, scale)
            if passes == "fwd+bwd":
                cpu_fast.fast_attention_backward(dout, None, q, k, v, out, lse, layout, fm, scale)
        return fn

    fns = {m: call(m) for m in MODES}
    shipped = cpu_fast.serial_bookkeeping
    try:
        for fn in fns.values():  # warm-up
            fn()
        runs = {m: [] for m in MODES}
        for i in range(reps):  # one run of every mode per round, the order rotating
            for m in list(MODES)[i % len(MODES):] + list(MODES)[:i % len(MODES)]:
                t0 = time.perf_counter()
                fns[m]()
                runs[m].append(time.perf_counter() - t0)
    finally:
        cpu_fast.serial_bookkeeping = shipped
    row = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "pass": passes,
           "density": round(mask_density(fm, layout), 4), "reps": reps, "threads": torch.get_num_threads()}
    for m, t in runs.items():
        row[f"{m}_min_ms"] = round(min(t) * 1e3, 1)
        row[f"{m}_median_ms"] = round(statistics.median(t) * 1e3, 1)
    for m in ("process", "none"):
        row[f"{m}_over_thread_min"] = round(row[f"{m}_min_ms"] / row["thread_min_ms"], 3)
        row[f"{m}_over_thread_median"] = round(row[f"{m}_median_ms"] / row["thread_median_ms"], 3)
    row["load"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(ap)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    with args.out.open("a") as fh:
        for shape in args.shapes:
            for dt in args.dtypes:
                for density in args.densities:
                    for passes in args.passes:
                        row = run_row(shape, getattr(torch, dt), density, passes, args.reps)
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
