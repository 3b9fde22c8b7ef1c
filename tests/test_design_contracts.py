"""Contracts of the package's design (issue 23): settings scoped to the optimised model, layering, configuration."""
from __future__ import annotations

import ast
import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from core_models import build_tiny, out_of

import vdit_compile as vc

PKG = Path(vc.__file__).resolve().parent


def _dynamo_settings() -> dict:
    cfg = torch._dynamo.config
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "capture_dynamic_output_shape_ops",
             "capture_scalar_outputs")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


def test_dynamo_settings_are_scoped_to_the_optimised_forward():
    before = _dynamo_settings()
    model, kw = build_tiny("wan")
    vc.optimize(model, plan=vc.TileMask(1, 0))
    with torch.no_grad():
        model(**kw)
    assert _dynamo_settings() == before  # nothing raised process-wide while the model is optimised
    vc.restore(model)
    assert _dynamo_settings() == before


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PKG.parent).with_suffix("").parts
    pkg = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - (node.level - 1)])
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_nothing_below_the_cli_imports_it():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.parent.name != "cli"
                 and any(m == "vdit_compile.cli" or m.startswith("vdit_compile.cli.") for m in _imports(p))]
    assert offenders == []


def test_calibration_does_not_import_the_api():
    offenders = [str(p.relative_to(PKG)) for p in (PKG / "calibration").rglob("*.py")
                 if "vdit_compile.api" in _imports(p)]
    assert offenders == []


def test_vdit_environment_variables_are_read_in_one_debug_helper():
    reads = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
             if re.search(r"(environ|env)(\.get)?\s*[\[(]\s*[\"']VDIT_", p.read_text(encoding="utf-8"))]
    assert reads == ["kernels/options.py"]


def test_kernel_options_travel_with_the_model():
    from vdit_compile.kernels.options import KernelOptions, current

    seen = []
    model, kw = build_tiny("wan")
    opts = KernelOptions(path="portable", mask_gather=True)
    vc.optimize(model, plan=vc.TileMask(1, 0), kernel=opts)
    hook = model.blocks[0].register_forward_pre_hook(lambda *a: seen.append(current()))
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        hook.remove()
        vc.restore(model)
    assert seen and all(s == opts for s in seen)
    assert current() != opts  # outside the model's calls the defaults are back


def _run_and_drop(name: str, **optimize_kw):
    """Optimise a tiny model, run it, drop the user's references; the weak reference that is left."""
    model, kw = build_tiny(name)
    vc.optimize(model, **optimize_kw)
    with torch.no_grad():
        model(**kw)
    ref = weakref.ref(model)
    del model
    gc.collect()
    return ref


@pytest.mark.parametrize("name,optimize_kw", [
    ("wan", {"plan": vc.TileMask(1, 0)}),  # apply mode only
    ("wan", {"calib_inputs": None, "progress": False}),  # calibrate, then apply: two backends
    ("hunyuan15", {"plan": vc.TileMask(1, 0)}),  # graph breaks: graphs of a block's own frame, shared
])
def test_an_optimised_model_is_freed_after_del(name, optimize_kw):
    # Dynamo keeps every backend it saw in a process-wide table (eval_frame.cached_backends): the backend
    # must reach the model only weakly, or each optimised model lives as long as the process
    if "calib_inputs" in optimize_kw:
        optimize_kw = dict(optimize_kw, calib_inputs=[build_tiny(name)[1]])
    assert _run_and_drop(name, **optimize_kw)() is None


def test_a_freed_models_graphs_do_not_serve_the_next_one():
    assert _run_and_drop("wan", plan=vc.TileMask(1, 0))() is None
    model, kw = build_tiny("wan")
    with torch.no_grad():
        dense = out_of(model(**kw))
        vc.optimize(model, plan=vc.TileMask(dense=True))
        out = out_of(model(**kw))
    vc.restore(model)
    assert torch.allclose(out, dense, atol=1e-5, rtol=1e-4)
