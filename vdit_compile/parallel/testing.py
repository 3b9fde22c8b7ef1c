"""Run a function on a CPU gloo group of W processes and collect what each rank returns.

Starting gloo processes is slow (~1-3 s each group), so tests run many cases inside one
spawned group: the worker returns a dict per rank, the parent gets the list.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
    except Exception:  # reported to the parent, which raises
        result = {"__error__": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_on_gloo(world_size: int, fn, *args) -> list:
    """``fn(*args)`` on every rank of a fresh gloo group; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_entry, args=(world_size, _free_port(), outdir, fn, args), nprocs=world_size, join=True)
        results = []
        for r in range(world_size):
            with open(os.path.join(outdir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    for r, res in enumerate(results):
        if isinstance(res, dict) and "__error__" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['__error__']}")
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` (0 for two empty tensors)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
