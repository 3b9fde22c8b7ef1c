"""TensorRT path: the decomposed program TensorRT converts (CPU), and a real engine where TensorRT exists."""
import json
import sys
from pathlib import Path

import pytest
import torch

from vdit_compile import inspect_model, optimize
from vdit_compile.export.errors import MissingDependencyError
from vdit_compile.export.tensorrt import prepare_for_tensorrt, require_torch_tensorrt
from vdit_compile.plans import Plan

sys.path.insert(0, str(Path(__file__).parent))
from core_models import build_tiny  # noqa: E402


def _trt_available() -> bool:
    try:
        require_torch_tensorrt()
    except MissingDependencyError:
        return False
    return torch.cuda.is_available()


def _plan(model, inputs, names=("g1w0", "g0w1")):
    from vdit_compile.masks import parse_mask

    specs = [parse_mask(n) for n in names]
    plan = Plan.uniform(inspect_model(model, inputs), specs[0], model)  # window families get a token tile
    for s in plan.tiled_sites():
        s.masks = list(specs)
    return plan


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_decomposed_program_matches_core_rewrite():
    """What TensorRT would convert: no vdit op left, same output as the core's rewritten model (a frame tile
    head and a 3D window head on token tiles: the decomposition reads any family's unit mask)."""
    model, inputs = build_tiny("cogvideox")
    plan = _plan(model, inputs, ("win3d-t1h0w1-g1", "g0w1"))
    ep, _, facts = prepare_for_tensorrt(model, inputs, plan)
    assert len(facts) == 2 and not any("vdit" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        got = ep.module()(**inputs)[0]
        ref = optimize(model, plan=plan, backend="eager", progress=False)(**inputs).sample
    assert _rel(got, ref) < 1e-5


def test_missing_tensorrt_message():
    try:
        require_torch_tensorrt()
    except MissingDependencyError as exc:
        assert 'pip install "vdit-compile[trt]"' in str(exc)
    else:
        pytest.skip("torch_tensorrt is installed here")


@pytest.mark.gpu
@pytest.mark.skipif(not _trt_available(), reason="needs torch_tensorrt, TensorRT and a CUDA device")
def test_tensorrt_engine_fp16(tmp_path):  # pragma: no cover - not runnable on the machines of this project
    import tensorrt as trt

    from vdit_compile.export.tensorrt import check_tensorrt, to_tensorrt

    model, inputs = build_tiny("wan")
    plan = _plan(model, inputs)
    path = to_tensorrt(model, inputs, tmp_path / "wan.engine", plan, precision="fp16")
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["precision"] == "fp16" and meta["fingerprint"].startswith("sha256:") and meta["plan"]["sites"]
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    assert engine is not None and engine.num_io_tensors >= len(meta["inputs"]) + 1
    err, ok = check_tensorrt(path, model, inputs, plan)  # engine vs the fp32 core rewrite on fresh inputs
    assert ok, err
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
