"""``--check``: run the exported file with ONNX Runtime on fresh random inputs and compare with PyTorch.

The PyTorch side is the rewritten model: ``vdit_compile.optimize(model, plan=...)`` (the core's
rewrite, run eagerly) when the core is importable, else the rewritten exported program.  Error is
the relative L2 error ``||ort - torch|| / ||torch||`` of every output, in fp32.  Latency is the
median wall time of ``repeats`` runs after one warm-up, on this machine, for ONNX Runtime (CPU
provider), the rewritten PyTorch model, and the original dense PyTorch model (eager).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..plans import unwrap_model
from .runner import OnnxRunner

#: Acceptance bound of ``--check`` in fp32.
REL_TOL = 1e-4


@dataclass
class CheckReport:
    rel_err: float
    max_abs: float
    ort_ms: float
    torch_rewritten_ms: float
    torch_dense_ms: float
    reference: str
    shapes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rel_err < REL_TOL

    def summary(self) -> str:
        shp = ", ".join(f"{k}{list(v)}" for k, v in self.shapes.items())
        return (f"check {'OK' if self.ok else 'FAILED'}: relative L2 error {self.rel_err:.2e} (bound {REL_TOL:.0e}), "
                f"max abs {self.max_abs:.2e} vs {self.reference}\n"
                f"latency (median, this CPU): ONNX Runtime {self.ort_ms:.1f} ms | PyTorch rewritten {self.torch_rewritten_ms:.1f} ms"
                f" | PyTorch dense eager {self.torch_dense_ms:.1f} ms  [{shp}]")


def fresh_inputs(example: Mapping, seed: int, frames: tuple[int, int] | None = None) -> dict:
    """Random float tensors shaped like ``example``; ``frames=(axis, n)`` resizes hidden_states.

    Integer and bool tensors (timesteps, position indices, masks) are kept: random values there
    would be out-of-range indices, not fresh data.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x.clone()

    out = {k: pytree.tree_map(rand, v) for k, v in example.items()}
    if frames is not None:
        axis, n = frames
        hs = out["hidden_states"]
        shape = list(hs.shape)
        shape[axis] = n
        out["hidden_states"] = torch.randn(shape, generator=g, dtype=hs.dtype)
    return out


def _time(fn: Callable, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _flat_outputs(out) -> list[np.ndarray]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t.detach().float().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def rewritten_reference(model, plan, program=None):
    """``(callable, description)`` of the PyTorch rewritten model (see module doc)."""
    module = unwrap_model(model)
    try:
        import vdit_compile

        if vdit_compile.plan_of(module) is not None:
            return module, "the model as rewritten by vdit_compile.optimize"
        optimized = vdit_compile.optimize(copy.deepcopy(module), plan=plan, backend="eager", progress=False,
                                          cost_model="always")  # the ONNX file has every tiled site sparse
        return optimized, "PyTorch rewritten by vdit_compile.optimize (eager)"
    except Exception as exc:  # noqa: BLE001 - fall back to the exported graph, saying so
        if program is None:
            raise
        return program.module(), f"the rewritten exported program (optimize unavailable: {type(exc).__name__}: {exc})"


def check_export(path, model, example_inputs: Mapping, plan, *, program=None, seed: int = 1234, repeats: int = 5,
                 frames: tuple[int, int] | None = None, threads: int | None = None) -> CheckReport:
    """Compare the ONNX file with the rewritten PyTorch model on fresh inputs; time both (see module doc)."""
    runner = OnnxRunner(path, threads=threads)
    inputs = fresh_inputs(example_inputs, seed, frames)
    reference, desc = rewritten_reference(model, plan, program)
    dense = unwrap_model(model)
    if reference is dense:  # an optimised model: time the dense original through its class forward
        dense = type(dense).forward.__get__(dense)
    with torch.no_grad():
        ref = _flat_outputs(reference(**inputs))
        got = list(runner(**inputs).values())
        if len(got) != len(ref):
            raise AssertionError(f"ONNX model has {len(got)} outputs, PyTorch {len(ref)}")
        num = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(got, ref))
        den = sum(float(np.sum(b.astype(np.float64) ** 2)) for b in ref)
        max_abs = max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref))
        feeds = runner.feeds(inputs)
        ort_ms = _time(lambda: runner.session.run(None, feeds), repeats)
        rew_ms = _time(lambda: reference(**inputs), repeats)
        dense_ms = _time(lambda: dense(**inputs), repeats)
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return CheckReport((num / max(den, 1e-300)) ** 0.5, max_abs, ort_ms, rew_ms, dense_ms, desc, shapes)
