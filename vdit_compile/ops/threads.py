"""One thread for the CPU op's bookkeeping, all of the caller's threads for its kernels: on the calling thread only.

Why one thread: the copies, additions and gathers around the fused kernels (:mod:`.cpu_fast`) are small
memory-bound operations. A second thread gains little on them, and every parallel region waits for its slowest
thread, which on a shared (oversubscribed) CPU is often descheduled: 8 strided additions of 2 MB took 156 ms on
2 threads and 2.7 ms on one under load 7 on 2 cores; with the bookkeeping on every thread the op ran up to x1.6
slower (median; x1.9 at worst) on a loaded 2-core machine (BENCHMARKS.md, "CPU op: bookkeeping on one thread of the
calling thread only"; ``benchmarks/cpu_bookkeeping.py``).

Why not ``torch.set_num_threads`` (the op's way before): it is process-wide. Besides the calling thread's count it
sets the count that every thread starting torch work later takes (a thread that starts during the op keeps one
thread for good) and, in ATen's OpenMP build, also sets the shared pthreadpool's size and clears oneDNN's
computation cache.
Here only the calling thread's own counts change, and are put back on exit, also on error:

* its OpenMP ``nthreads-var`` (``omp_set_num_threads`` acts on the calling thread), which ``at::get_num_threads``
  reads and every ATen parallel region of this thread follows;
* its MKL count (``mkl_set_num_threads_local``, thread-local by definition): MKL's vector math (e.g. ``exp`` of
  float tensors) threads itself, and after a ``torch.set_num_threads(n)`` runs on n threads whatever OpenMP says.

Both are reached through the libraries torch loaded; where one cannot be reached (no OpenMP build, no MKL), that
part is left alone (correct, possibly slower on a loaded machine).
"""
from __future__ import annotations

import ctypes
import glob
import os
from contextlib import contextmanager
from functools import lru_cache

import torch


def _symbol(name: str):
    """``name`` from the process's global symbols (torch's libgomp / libiomp5 on Linux wheels) or from
    libtorch_cpu (which links MKL statically); None if neither has it."""
    libs = [None] + sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path) if path is None else ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0))
            return getattr(lib, name)
        except (OSError, AttributeError):
            continue
    return None


@lru_cache(maxsize=1)
def _omp():
    """torch's ``omp_set_num_threads``, or None where it cannot be reached or torch does not follow it (checked
    once: setting this thread's count must show in ``torch.get_num_threads``)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    set_threads = _symbol("omp_set_num_threads")
    if set_threads is None:
        return None
    n = torch.get_num_threads()
    probe = 1 if n > 1 else 2
    set_threads(probe)
    try:
        follows = torch.get_num_threads() == probe
    finally:
        set_threads(n)
    return set_threads if follows else None


@lru_cache(maxsize=1)
def _mkl():
    """MKL's ``mkl_set_num_threads_local`` (its C entry point, ``MKL_Set_Num_Threads_Local``: sets the calling
    thread's count, returns the previous one; 0 = MKL's global count), or None (checked once: it must hand back
    the count it was given)."""
    if not torch.backends.mkl.is_available():
        return None
    set_local = _symbol("MKL_Set_Num_Threads_Local")
    if set_local is None:
        return None
    before = set_local(1)
    return set_local if set_local(before) == 1 else None


@contextmanager
def serial_bookkeeping():
    """Run the block on one thread of the calling thread; yields ``par(fn, *args, **kw)``, which runs one kernel
    call with the caller's thread count (``par.threads``)."""
    n = torch.get_num_threads()
    omp = _omp() if n > 1 else None
    mkl = _mkl() if omp is not None else None

    def par(fn, *args, **kw):
        if omp is None:
            return fn(*args, **kw)
        omp(n)
        if mkl is not None:
            mkl(mkl_caller)
        try:
            return fn(*args, **kw)
        finally:
            omp(1)
            if mkl is not None:
                mkl(1)

    par.threads = n
    if omp is None:
        yield par
        return
    mkl_caller = mkl(1) if mkl is not None else None
    omp(1)
    try:
        yield par
    finally:
        omp(n)
        if mkl is not None:
            mkl(mkl_caller)
