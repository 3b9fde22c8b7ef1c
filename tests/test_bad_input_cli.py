"""Issue 24, command line: bad options and paths are refused with one clear sentence before any long work.

"Before any long work" is checked by giving a MODEL that would take seconds to load (or does not even
exist where it matters) and asserting that the error comes anyway, and that nothing was written.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vdit_compile.cli.main import main as cli
from vdit_compile.cli.model_spec import ModelSpecError, load_input_list
from vdit_compile.plans import Plan

HELPERS = str(Path(__file__).with_name("calib_helpers.py"))
BOOM = f"{Path(__file__).with_name('no_such_factory.py')}:model"  # loading it would fail: errors must come first


def _err(capsys, argv, code=1) -> str:
    assert cli(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 3, err
    return err


def _usage_err(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle moving left\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 8)
    return tmp_path


@pytest.mark.parametrize("out, words", [
    ("a_file/plan.json", ["a_file is a file"]),
    (".", ["expected a file path", "directory"]),
])
def test_calibrate_output_path_checked_before_the_model_loads(files, capsys, out, words):
    err = _err(capsys, ["calibrate", BOOM, "--prompts", str(files / "prompts.txt"), "-o", str(files / out)])
    for w in words:
        assert w in err, err


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_calibrate_output_in_a_read_only_directory(files, capsys):
    ro = files / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _err(capsys, ["calibrate", BOOM, "--prompts", str(files / "prompts.txt"), "-o", str(ro / "plan.json")])
        assert "not writable" in err
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("argv, words", [
    (["calibrate", BOOM, "-o", "p.json", "--budget", "abc"], ["--budget", "expected a number", "'abc'"]),
    (["calibrate", BOOM, "-o", "p.json", "--budget", "nan"], ["--budget", "NaN"]),
    (["calibrate", BOOM, "-o", "p.json", "--budget=-1"], ["--budget", ">= 0"]),
    (["calibrate", BOOM, "-o", "p.json", "--steps", "0"], ["--steps", ">= 1"]),
    (["calibrate", BOOM, "-o", "p.json", "--max-density", "2"], ["--max-density", "<= 1"]),
    (["score", "embedded", "--steps", "0"], ["--steps", ">= 1", "found 0"]),
    (["score", "embedded", "--prompts=-3"], ["--prompts", ">= 1"]),
    (["export", BOOM, "--onnx", "x.onnx", "--frames", "0"], ["--frames", ">= 1"]),
])
def test_numeric_options_are_refused_by_the_parser(capsys, argv, words):
    err = _usage_err(capsys, argv)
    for w in words:
        assert w in err, err


def test_empty_candidate_list_is_refused(files, capsys):
    err = _err(capsys, ["calibrate", BOOM, "--prompts", str(files / "prompts.txt"), "-o", str(files / "p.json"),
                        "--candidates", ","])
    assert "--candidates must name at least one mask" in err and "empty list" in err


def test_budget_zero_calibrates(tmp_path, capsys):
    from calib_helpers import wan_inputs

    inputs = tmp_path / "inputs.pt"
    torch.save([wan_inputs(seed=1)], inputs)
    out = tmp_path / "plan.json"
    assert cli(["calibrate", f"{HELPERS}:tiny_wan_module", "--inputs", str(inputs), "-o", str(out), "--budget", "0",
                "--candidates", "g0w0,g1w0"]) == 0
    plan = Plan.load(out)
    assert plan.calibration["error_budget"] == 0
    for s in plan.tiled_sites():
        assert len(s.masks) == s.num_heads


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(files, capsys):
    err = _err(capsys, ["calibrate", BOOM, "--prompts", str(files / "prompts.txt"), "-o", str(files / "p.json"),
                        "--device", "cuda"])
    assert "--device" in err and "CUDA is not available" in err
    err = _err(capsys, ["export", BOOM, "--onnx", str(files / "x.onnx"), "--device", "cuda"])
    assert "CUDA is not available" in err


def test_plan_show_binary_file_and_directory(files, capsys):
    err = _err(capsys, ["plan", "show", str(files / "binary.bin")])
    assert "expected a plan JSON file" in err and "binary" in err
    err = _err(capsys, ["plan", "show", str(files)])
    assert "found a directory" in err and "does not exist" not in err


def test_inputs_pointing_at_a_text_file(files):
    with pytest.raises(ModelSpecError, match="found a text file"):
        load_input_list(files / "prompts.txt")
    with pytest.raises(ModelSpecError, match="cannot read it"):
        load_input_list(files / "binary.bin")


def test_calibrate_prompts_file_must_be_text(files, capsys):
    err = _err(capsys, ["calibrate", BOOM, "--prompts", str(files / "binary.bin"), "-o", str(files / "p.json")])
    assert "expected a UTF-8 text file" in err


@pytest.mark.parametrize("out, words", [
    ("a_file/x.onnx", ["a_file is a file"]),
    (".", ["expected a file path", "directory"]),
])
def test_export_output_checked_before_tracing(files, capsys, out, words):
    err = _err(capsys, ["export", BOOM, "--onnx", str(files / out)])
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("option, value, words", [
    ("--lr", "-1e-4", ["--lr", "> 0"]),
    ("--lr", "nan", ["--lr", "NaN"]),
    ("--huber-c", "-1", ["--huber-c", "> 0"]),
    ("--kd-lr", "0", ["--kd-lr", "> 0"]),
])
def test_distill_numeric_options_fail_before_the_run_dir_exists(tmp_path, capsys, option, value, words):
    from vdit_compile.distill.run import main

    out = tmp_path / "run"
    assert main(["--model", "tiny", "--out", str(out), "--device", "cpu", "--no-eval", f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not out.exists()  # a rerun needs no --overwrite


def test_calibrate_checks_every_prompt_before_running_any(files, capsys, monkeypatch):
    from vdit_compile.cli import cmd_calibrate
    from vdit_compile.models.embedded.tokenizer import CaptionTokenizer

    class Pipe:  # a pipeline whose tokenizer refuses unknown words; it must never be called
        transformer = torch.nn.Linear(1, 1)
        tokenizer = CaptionTokenizer()
        calls = 0

        def __call__(self, *a, **k):
            Pipe.calls += 1

    monkeypatch.setattr(cmd_calibrate, "load_for_cli", lambda args: (Pipe(), None))
    (files / "prompts.txt").write_text("a red circle moving left\na white square\na red blob\n")
    err = _err(capsys, ["calibrate", "embedded", "--prompts", str(files / "prompts.txt"), "-o", str(files / "p.json")])
    assert "2 of 3 calibration prompt(s) cannot be tokenized" in err and "'white'" in err
    assert Pipe.calls == 0 and not (files / "p.json").exists()
