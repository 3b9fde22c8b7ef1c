"""``vdit-compile export``: a real export with --check, and every bad input giving a clear error."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from vdit_compile.cli.main import main  # noqa: E402

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def tiny_wan():
    """``module:factory`` target for the CLI: (model, example forward kwargs)."""
    from core_models import build_tiny

    return build_tiny("wan")


SPEC = f"{HERE}:tiny_wan"


def _run(capsys, *argv):
    code = main(["export", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _has_trt() -> bool:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def test_export_with_check_then_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "wan.onnx"
    code, stdout, stderr = _run(capsys, SPEC, "--plan", "g1w0", "--onnx", out, "--check")
    assert code == 0, stderr
    assert out.is_file() and "check OK" in stdout and "ONNX Runtime" in stdout and "tiled sites: 2" in stdout
    assert "every dimension is fixed" in stdout
    code, _, stderr = _run(capsys, SPEC, "--plan", "g1w0", "--onnx", out)
    assert code == 1 and "already exists" in stderr and "--overwrite" in stderr


def test_no_plan_is_refused(tmp_path, capsys):
    code, _, stderr = _run(capsys, SPEC, "--onnx", tmp_path / "x.onnx")
    assert code == 1 and "no plan" in stderr and "--plan" in stderr
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_model_and_missing_plan_file(tmp_path, capsys):
    code, _, stderr = _run(capsys, "no_such_model_xyz", "--plan", "g1w0", "--onnx", tmp_path / "x.onnx")
    assert code == 1 and "cannot interpret model spec" in stderr
    code, _, stderr = _run(capsys, SPEC, "--plan", tmp_path / "missing.json", "--onnx", tmp_path / "x.onnx")
    assert code == 1 and "plan file" in stderr and "not found" in stderr


def test_nothing_to_do(capsys):
    code, _, stderr = _run(capsys, SPEC, "--plan", "g1w0")
    assert code == 1 and "--onnx" in stderr


def test_plan_for_another_shape_is_refused(tmp_path, capsys):
    """A plan made at 8x8 latents cannot serve a 12x8 export: the error says what differs."""
    from vdit_compile import TileMask, inspect_model
    from vdit_compile.plans import Plan

    model, inputs = tiny_wan()
    plan_path = tmp_path / "plan.json"
    Plan.uniform(inspect_model(model, inputs), TileMask(1, 0), model).save(plan_path)
    code, _, stderr = _run(capsys, SPEC, "--plan", plan_path, "--onnx", tmp_path / "x.onnx", "--height", 12)
    assert code == 1 and "layout differs" in stderr and "height" in stderr


def test_frames_on_pre_patchified_model_is_refused(tmp_path, capsys):
    code, _, stderr = _run(capsys, f"{HERE}:tiny_ltx", "--plan", "g1w0", "--onnx", tmp_path / "x.onnx", "--frames", 6)
    assert code == 1 and "no frame/height/width axes" in stderr


def tiny_ltx():
    from core_models import build_tiny

    return build_tiny("ltx")


@pytest.mark.skipif(_has_trt(), reason="torch_tensorrt is installed: the missing-dependency message cannot occur")
def test_trt_without_tensorrt_names_the_extra(tmp_path, capsys):
    code, _, stderr = _run(capsys, SPEC, "--plan", "g1w0", "--trt", tmp_path / "x.engine", "--fp16")
    assert code == 1 and 'pip install "vdit-compile[trt]"' in stderr
    assert not (tmp_path / "x.engine").exists()
