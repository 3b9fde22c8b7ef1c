"""Bad inputs get a clear error before any training starts, and nothing written is overwritten."""
import json

import pytest

from vdit_compile.distill import DistillConfig, DistillConfigError
from vdit_compile.distill.run import main, run

SMOKE = ["--model", "tiny", "--teacher-steps", "8", "--segments", "2", "--pool-size", "4", "--batch-size", "2",
         "--mlcd-steps", "2", "--stages", "mlcd", "--no-eval", "--device", "cpu", "--precision", "fp32",
         "--ckpt-every", "1"]


def _main_err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_segments_must_divide_the_teacher_steps(tmp_path, capsys):
    err = _main_err(capsys, [*SMOKE, "--segments", "3", "--out", str(tmp_path / "r")])
    assert "--segments 3 does not divide --teacher-steps 8" in err
    assert not (tmp_path / "r").exists()


def test_sample_steps_must_fit_the_segments(tmp_path):
    with pytest.raises(DistillConfigError, match="sample step count 3 is not usable"):
        run(DistillConfig.smoke(tmp_path / "r", sample_steps="3"), progress=False)


def test_missing_and_empty_prompts_files(tmp_path, capsys):
    err = _main_err(capsys, [*SMOKE, "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")])
    assert "prompts file" in err and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    err = _main_err(capsys, [*SMOKE, "--prompts", str(empty), "--out", str(tmp_path / "r")])
    assert "holds no prompts" in err
    assert not (tmp_path / "r").exists()


def test_unknown_model_and_stage(tmp_path, capsys):
    err = _main_err(capsys, [*SMOKE, "--model", "no_such_module:factory", "--out", str(tmp_path / "r")])
    assert "cannot load model 'no_such_module:factory'" in err
    err = _main_err(capsys, [*SMOKE, "--stages", "mlcd,bogus", "--out", str(tmp_path / "r")])
    assert "--stages must be a comma-separated subset" in err


def test_plan_for_another_model_is_refused(tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    from vdit_compile.masks import TileMask
    from vdit_compile.plans import Plan

    other = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                  out_channels=3, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)
    plan = tmp_path / "other.json"
    Plan.uniform([], TileMask(1, 0), model=other).save(plan)
    err = _main_err(capsys, [*SMOKE, "--stages", "mlcd,masks", "--plan", str(plan), "--out", str(tmp_path / "r")])
    assert "does not fit model 'tiny'" in err and "fingerprint" in err
    assert not (tmp_path / "r").exists()


def test_existing_out_dir_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = _main_err(capsys, [*SMOKE, "--out", str(out)])
    assert "already exists" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main([*SMOKE, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "precious.txt").exists() and (out / "mlcd" / "weights.safetensors").is_file()


def test_corrupt_checkpoint_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*SMOKE, "--out", str(out)]) == 0
    (out / "mlcd" / "done.json").unlink()  # pretend the stage was cut short
    ck = out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    before = (out / "mlcd" / "weights.safetensors").read_bytes()
    err = _main_err(capsys, ["--resume", str(out)])
    assert "corrupt" in err and "model.safetensors" in err
    assert (out / "mlcd" / "weights.safetensors").read_bytes() == before
    err = _main_err(capsys, ["--resume", str(out), "--lr", "1"])
    assert "--resume takes the run's own config.json" in err
