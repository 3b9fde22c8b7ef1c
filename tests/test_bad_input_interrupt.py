"""Issue 24, interruption: a kill between the temporary write and the rename never loses a file.

The kill is simulated by raising ``KeyboardInterrupt`` from ``os.replace`` (the rename) or from the
writer itself; what is on disk afterwards is then checked: the previous file intact, no 0-byte file,
no temporary left behind, and ``--resume`` finding the newest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from vdit_compile import atomic
from vdit_compile.distill import checkpoint as ck
from vdit_compile.layout import TokenLayout
from vdit_compile.masks.tile import TileMask
from vdit_compile.passes.detect import AttentionSite
from vdit_compile.plans import Plan


def _plan(mask: TileMask) -> Plan:
    site = AttentionSite(name="blocks.0.attn1", kind="video_self", layout=TokenLayout(num_frames=4, height=2, width=2),
                         num_heads=2, head_dim=8)
    return Plan.uniform([site], mask)


def _interrupt_rename(monkeypatch, match=lambda dst: True):
    real = os.replace

    def replace(src, dst, *a, **k):
        if match(Path(dst)):
            raise KeyboardInterrupt("killed between the temporary write and the rename")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(ck.os, "replace", replace)


def _no_temporaries(directory: Path):
    left = [p.name for p in Path(directory).rglob(".*") if p.name.endswith(".tmp") or p.is_dir()]
    assert not left, left


def test_plan_save_interrupted_keeps_the_old_plan(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    _plan(TileMask(1, 0)).save(path)
    before = path.read_bytes()
    _interrupt_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _plan(TileMask(2, 1)).save(path)
    assert path.read_bytes() == before and Plan.load(path).sites[0].masks[0] == TileMask(1, 0)
    _no_temporaries(tmp_path)
    monkeypatch.undo()
    _plan(TileMask(2, 1)).save(path)
    assert Plan.load(path).sites[0].masks[0] == TileMask(2, 1)


def test_atomic_path_interrupted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old model")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(path) as tmp:
        tmp.write_bytes(b"half a mod")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old model"
    _no_temporaries(tmp_path)


class _FakeProgram:
    """Stands in for ``torch.onnx.ONNXProgram``: ``save`` writes the model and (optionally) its external data."""

    def __init__(self, payload: bytes, fail: bool = False):
        self.payload, self.fail = payload, fail

    def save(self, destination: str, external_data: bool = False):
        dst = Path(destination)
        dst.write_bytes(self.payload[: len(self.payload) // 2])
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")
        dst.write_bytes(self.payload)
        if external_data:
            Path(str(dst) + ".data").write_bytes(b"weights " + self.payload)


def test_onnx_save_is_atomic_and_keeps_external_data_names(tmp_path, monkeypatch):
    from vdit_compile.export.onnx import check_output_path, save_atomically

    path = tmp_path / "out" / "transformer.onnx"
    save_atomically(_FakeProgram(b"first model"), path, external_data=True)
    assert path.read_bytes() == b"first model"
    assert Path(str(path) + ".data").read_bytes() == b"weights first model"
    with pytest.raises(KeyboardInterrupt):
        save_atomically(_FakeProgram(b"second model", fail=True), path, external_data=False)
    assert path.read_bytes() == b"first model"
    _interrupt_rename(monkeypatch, match=lambda dst: dst.suffix == ".onnx")
    with pytest.raises(KeyboardInterrupt):
        save_atomically(_FakeProgram(b"third model"), path, external_data=False)
    assert path.read_bytes() == b"first model"
    _no_temporaries(tmp_path)
    empty = tmp_path / "empty.onnx"  # what an interrupted export of an older version left
    empty.write_bytes(b"")
    assert check_output_path(empty, overwrite=False) == empty


class _Tiny(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), value))


def _save(run, step, value, **kw):
    return ck.save_checkpoint(run, "kd", step, {"student": _Tiny(value)}, {"step": step, "value": value}, **kw)


def _pointer(run: Path) -> str:
    return json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]


def test_resaving_a_checkpoint_name_never_leaves_latest_dangling(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 10, 1.0)
    assert _pointer(run) == "kd-00000010"
    # a resume that ends the stage at the same step saves the same stage/step again; kill it at each rename
    for target in ("kd-00000010-r1", "latest.json"):
        _interrupt_rename(monkeypatch, match=lambda dst, t=target: dst.name == t)
        with pytest.raises(KeyboardInterrupt):
            _save(run, 10, 2.0)
        monkeypatch.undo()
        found = ck.latest_checkpoint(run)
        assert found is not None and found.is_dir()
        assert (run / "checkpoints" / _pointer(run)).is_dir()
        state = ck.load_checkpoint(found, {"student": _Tiny(0.0)})
        assert state["step"] == 10
    final = _save(run, 10, 3.0)
    assert _pointer(run) == final.name and ck.load_checkpoint(final, {"student": _Tiny(0.0)})["value"] == 3.0
    _no_temporaries(run / "checkpoints")


def test_resume_recovers_a_complete_checkpoint_whose_rename_was_cut_off(tmp_path):
    """The window the old save_checkpoint had: old directory deleted, new one still under its temporary name."""
    run = tmp_path / "run"
    _save(run, 5, 1.0)
    newest = _save(run, 10, 2.0)
    root = run / "checkpoints"
    os.rename(newest, root / ".kd-00000010.abc123")  # the complete new checkpoint, never renamed into place
    (root / ".latest.json.xyz.tmp").write_text("{")  # a stale pointer temporary
    with pytest.warns(UserWarning, match="does not exist; resuming from the newest complete checkpoint"):
        found = ck.latest_checkpoint(run)
    assert not found.name.startswith(".")
    assert ck.load_checkpoint(found, {"student": _Tiny(0.0)})["value"] == 2.0
    assert _pointer(run) == found.name  # the pointer is repaired: the next resume follows it silently
    assert not (root / ".latest.json.xyz.tmp").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.latest_checkpoint(run) == found


def test_resume_without_pointer_takes_the_newest_checkpoint_that_verifies(tmp_path):
    run = tmp_path / "run"
    older = _save(run, 5, 1.0)
    newer = _save(run, 10, 2.0)
    (newer / "student.safetensors").write_bytes(b"truncated")
    assert ck.latest_checkpoint(run) == newer  # the pointer is followed; corruption is reported, not skipped
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.verify_checkpoint(newer)
    (run / "checkpoints" / "latest.json").unlink()  # no pointer: the newest checkpoint that verifies
    with pytest.warns(UserWarning, match="missing"):
        assert ck.latest_checkpoint(run) == older
    for p in (run / "checkpoints").iterdir():
        if p.is_dir():
            (p / "meta.json").unlink()
    (run / "checkpoints" / "latest.json").write_text('{"checkpoint": "kd-00000099"}')
    with pytest.raises(ck.CheckpointError, match="no other complete checkpoint"):
        ck.latest_checkpoint(run)


def test_save_weights_interrupted_keeps_the_old_weights(tmp_path, monkeypatch):
    path = tmp_path / "kd" / "weights.safetensors"
    ck.save_weights(path, _Tiny(1.0))
    before = path.read_bytes()
    _interrupt_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ck.save_weights(path, _Tiny(2.0))
    assert path.read_bytes() == before
    _no_temporaries(tmp_path)
