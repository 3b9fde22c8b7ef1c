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


def _pyproject_extras() -> dict[str, list[str]]:
    import tomllib

    data = tomllib.loads((PKG.parent / "pyproject.toml").read_text(encoding="utf-8"))
    return data["project"]["optional-dependencies"]


def test_each_optional_module_names_an_extra_of_pyproject_that_installs_it():
    from vdit_compile._optional import EXTRAS

    extras = _pyproject_extras()
    for module, extra in EXTRAS.items():
        dists = [re.split(r"[<>=!~ ]", d)[0].replace("-", "_") for d in extras[extra]]
        assert module in dists, (module, extra, dists)


def test_a_missing_optional_dependency_names_the_feature_and_the_pip_extra(monkeypatch):
    import sys

    from vdit_compile._optional import MissingDependencyError, available, optional, require
    from vdit_compile.export.errors import ExportError
    from vdit_compile.export.errors import MissingDependencyError as ExportMissing

    monkeypatch.setitem(sys.modules, "torchao", None)  # an entry of None makes `import torchao` fail
    with pytest.raises(MissingDependencyError) as info:
        require("torchao", why="FP8 linears")
    msg = str(info.value)
    assert msg.startswith("FP8 linears: torchao is not available here") and msg.endswith('pip install "vdit-compile[fp8]"')
    assert info.value.extra == "fp8" and isinstance(info.value, ImportError)
    assert optional("torchao") is None
    with pytest.raises(ExportMissing) as info:  # a subsystem's own type: export's is also an ExportError
        require("torchao", why="x", error=ExportMissing)
    assert isinstance(info.value, ExportError) and isinstance(info.value, MissingDependencyError)
    assert str(info.value).startswith("x: torchao is not available here") and info.value.extra == "fp8"
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy")
    assert available("torch") and not available("no_such_module_vdit")


def test_fp8_without_torchao_says_which_extra(monkeypatch):
    import sys

    from vdit_compile.wholestep.fp8 import torchao_status

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.delitem(sys.modules, "torchao.quantization", raising=False)
    ok, why = torchao_status()
    assert not ok and 'pip install "vdit-compile[fp8]"' in why and "FP8 linears" in why


def test_optional_dependencies_stay_lazy():
    import subprocess
    import sys

    code = ("import sys, vdit_compile, vdit_compile.export, vdit_compile.wholestep; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime', 'torch_tensorrt', 'tensorrt', 'torchao') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_guards_outside_the_optional_helper():
    # one helper imports optional dependencies; our own subpackages ship together and are imported plainly.
    # Left: the Triton kernels' own import (a GPU-only fallback), a user's module named by a model spec, a world
    # package, and the MP4 writer's codec plugin (imageio-ffmpeg is no extra of ours)
    allowed = {"_optional.py", "kernels/tile_attention_triton.py", "models/spec.py", "models/embedded/pipeline.py"}
    guarded = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if re.search(r"except \(?(ImportError|ModuleNotFoundError)", p.read_text(encoding="utf-8"))]
    assert sorted(set(guarded) - allowed) == []


def test_a_refused_dynamic_frame_range_is_a_typed_error_with_torchs_suggestion():
    from vdit_compile.export.errors import DynamicFramesError
    from vdit_compile.export.graph import FRAMES_DIM, export_program

    class Bounded(torch.nn.Module):  # a RoPE-like table bounds the frame count at 16
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(16, 4))

        def forward(self, hidden_states):
            return hidden_states + self.table[: hidden_states.shape[1]]

    shapes = {"hidden_states": {1: torch.export.Dim(FRAMES_DIM, min=2, max=64)}}
    with pytest.raises(DynamicFramesError) as info:
        export_program(Bounded(), {"hidden_states": torch.randn(2, 4, 4)}, shapes)
    assert info.value.suggested is not None and info.value.suggested[1] == 16


@pytest.mark.parametrize("name", ["wan", "cogvideox", "cogvideox15", "kandinsky5", "hunyuan15"])
def test_export_reads_the_video_input_as_the_compile_path_does(name):
    from vdit_compile.export.shapes import frames_axis, spatial_axes, temporal_patch
    from vdit_compile.passes.grid import infer_grid, patch_sizes

    model, kw = build_tiny(name)
    grid, why = infer_grid(model, (), kw)
    assert grid is not None, why
    hs = kw["hidden_states"]
    assert frames_axis(model, hs) == grid.axes.index("T")
    assert spatial_axes(model, hs) == (grid.axes.index("H"), grid.axes.index("W"))
    assert temporal_patch(model) == patch_sizes(model)[0]
    assert hs.shape[frames_axis(model, hs)] // temporal_patch(model) == grid.frames


def test_export_has_no_grid_or_naming_code_of_its_own():
    text = {p.name: p.read_text(encoding="utf-8") for p in (PKG / "export").glob("*.py")}
    # the config's patch sizes and channels are read by passes/grid.py; module paths normalised by passes/naming.py
    assert not any(re.search(r"[\"']patch_size|[\"']in_channels|\b_modules\b", t) for t in text.values())


@pytest.mark.parametrize("path", ["blocks.0.attn1", "L['self'].blocks[0].attn1", "self._modules.blocks._modules.0.attn1",
                                  "L['self'].__dict__['_modules']['blocks'].0.attn1"])
def test_one_site_naming_for_dynamo_and_export_spellings(path):
    from vdit_compile.passes.naming import normalize_source, strip_self

    assert strip_self(normalize_source(path)) == "blocks.0.attn1"


def test_exported_sdpa_nodes_carry_the_compile_paths_site_names():
    from vdit_compile.export.graph import export_program, sdpa_nodes

    model, kw = build_tiny("wan")
    names = {s.name for s in vc.inspect_model(model, kw) if s.tileable}
    assert names and names <= set(sdpa_nodes(export_program(model, kw)))
