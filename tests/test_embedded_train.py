"""tools/train_reference.py: a few CPU steps of the tiny model into a tmp dir, then an exact resume."""
import csv
import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

from vdit_compile.models.embedded import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_reference", ROOT / "tools" / "train_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(out, steps):
    return ["--tiny", "--device", "cpu", "--no-compile", "--out", str(out), "--steps", str(steps), "--batch", "1",
            "--log-every", "1", "--sample-steps", "0", "--warmup", "1"]


def test_train_two_steps_then_resume_matches_uninterrupted(tmp_path):
    tr = _script()
    assert tr.main(_args(tmp_path / "a", 2)) == 0
    assert tr.main(_args(tmp_path / "a", 3) + ["--resume"]) == 0
    assert tr.main(_args(tmp_path / "b", 3)) == 0
    rows = list(csv.DictReader(open(tmp_path / "a" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    ra = load_file(str(tmp_path / "a" / "ckpt" / "model.safetensors"))
    rb = load_file(str(tmp_path / "b" / "ckpt" / "model.safetensors"))
    assert ra.keys() == rb.keys()
    for k in ra:  # same batches, same noise: resuming reproduces the uninterrupted run
        assert torch.allclose(ra[k], rb[k], atol=1e-6), k
    assert (tmp_path / "a" / "loss.png").is_file()
    pipe = load_pipeline(weights=tmp_path / "a" / "weights")
    assert pipe.default_guidance_scale == 3.0
    assert pipe.transformer.config.num_layers == 2


def test_init_from_starts_at_the_given_weights_and_rejects_another_architecture(tmp_path):
    tr = _script()
    assert tr.main(_args(tmp_path / "a", 2)) == 0
    # zero steps of fine-tuning: the written (EMA) weights must be exactly the source weights
    assert tr.main(_args(tmp_path / "b", 0) + ["--init-from", str(tmp_path / "a" / "weights")]) == 0
    src, dst = (load_pipeline(weights=tmp_path / d / "weights") for d in ("a", "b"))
    for n in ("transformer", "text_encoder"):
        sa, sb = getattr(src, n).state_dict(), getattr(dst, n).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (n, k)
    fresh = load_pipeline(weights=None, tiny=True, seed=123).transformer.state_dict()
    assert any(not torch.equal(fresh[k], src.transformer.state_dict()[k]) for k in fresh)  # the check can fail
    # the shipped (full-size) weights do not fit the tiny config: a clear error, no training
    import pytest
    with pytest.raises(SystemExit, match="does not match"):
        tr.main(_args(tmp_path / "c", 1) + ["--init-from", "default"])


def test_slim_checkpoint_resumes_with_fresh_moments_and_a_second_warmup(tmp_path, capsys):
    """tools/slim_checkpoint.py drops AdamW's moments; --resume then keeps weights, EMA, step and schedule place and
    warms the learning rate up again (a full-size step on fresh moments would be a jump)."""
    import shutil

    spec = importlib.util.spec_from_file_location("slim_checkpoint", ROOT / "tools" / "slim_checkpoint.py")
    slim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slim)
    tr = _script()
    assert tr.main(_args(tmp_path / "a", 2)) == 0
    assert slim.main([str(tmp_path / "a" / "ckpt"), str(tmp_path / "slim")]) == 0
    st = torch.load(tmp_path / "slim" / "state.pt", weights_only=False)
    assert "optimizer" not in st and st["step"] == 2
    full = torch.load(tmp_path / "a" / "ckpt" / "state.pt", weights_only=False)
    assert full["optimizer"]["state"]  # the full one had moments: the slim one really dropped something
    for n in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(d / n)) for d in (tmp_path / "a" / "ckpt", tmp_path / "slim"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "r").mkdir()
    shutil.copytree(tmp_path / "slim", tmp_path / "r" / "ckpt")
    capsys.readouterr()
    assert tr.main(_args(tmp_path / "r", 5) + ["--resume", "--warmup", "4"]) == 0
    assert "no optimizer state" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "r" / "loss.csv")))
    lrs = {int(r["step"]): float(r["lr"]) for r in rows}
    args = tr.parse_args(_args(tmp_path / "x", 5) + ["--warmup", "4"])
    # step 3 is the first after the resume at step 2: warmed up again to 1/4 of the schedule's rate
    assert abs(lrs[3] - tr.lr_at(args, 2) / 4) < 1e-9 * max(1.0, lrs[3]), lrs
    with __import__("pytest").raises(SystemExit, match="missing"):
        slim.main([str(tmp_path / "nothing"), str(tmp_path / "y")])


def test_weights_from_checkpoint_equal_the_weights_a_finished_run_writes(tmp_path):
    """tools/weights_from_checkpoint.py turns a checkpoint's EMA into the same weights file train_reference.py
    writes when the run ends (fp16 EMA, same keys), and load_pipeline takes it; a folder without EMA is refused."""
    import json

    import pytest

    spec = importlib.util.spec_from_file_location("weights_from_checkpoint", ROOT / "tools" / "weights_from_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tr = _script()
    assert tr.main(_args(tmp_path / "a", 2)) == 0
    assert tool.main([str(tmp_path / "a" / "ckpt"), str(tmp_path / "w"), "--world", "embedded", "--tiny",
                      "--summary", str(tmp_path / "a" / "train_summary.json")]) == 0
    want, got = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "a" / "weights", tmp_path / "w"))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["training"]["checkpoint_step"] == 2
    pipe = load_pipeline(weights=tmp_path / "w")
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"].half(), got["transformer.proj_out.weight"])
    with pytest.raises(SystemExit, match="ema.safetensors"):
        tool.main([str(tmp_path / "nothing"), str(tmp_path / "y")])
