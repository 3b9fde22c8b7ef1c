"""`vdit-compile score` and `vdit-compile demo` end to end on the tiny random embedded model (CPU)."""
import json

from vdit_compile.cli.main import main


def test_score_cli_smoke(tmp_path, capsys):
    out, cache = tmp_path / "card.json", tmp_path / "ref.pt"
    args = ["score", "embedded:tiny", "--steps", "1", "--reference-steps", "2", "--prompts", "2", "--device", "cpu",
            "--json", str(out), "--reference-clips", str(cache)]
    assert main(args) == 0
    card = json.loads(out.read_text())
    assert cache.is_file()
    assert card["settings"]["steps"] == 1 and card["clips"] == 2
    assert set(card["accuracy"]) == {"shape", "colour", "motion"}
    assert isinstance(card["psnr"], float) and 0 < card["ssim"] <= 1
    assert "| embedded:tiny" in capsys.readouterr().out


def test_score_cli_bad_target(capsys):
    assert main(["score", "no/such/model", "--prompts", "1"]) == 2
    assert "cannot load TARGET" in capsys.readouterr().err


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--steps", "1", "--prompts", "2", "--calib-prompts", "1", "--calib-steps", "1",
            "--device", "cpu", "--out", str(out), "--fast"]
    assert main(args) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "dense sampling" in summary["steps_done"]
    try:
        from vdit_compile import optimize  # noqa: F401
    except ImportError:  # the core is not installed: the demo must say so, not pretend
        assert any("vdit_compile.optimize is not available" in m for m in summary["missing"])
    else:
        assert "optimised sampling" in summary["steps_done"] and "attention sites and chosen masks" in text
        assert (out / "plan.json").is_file() and (out / "dense_vs_optimised.gif").is_file()
        assert [c["name"] for c in summary["cards"]][:2] == ["dense (reference)", "tile-sparse"]
        assert "blocks.0.attn1" in text
        assert "mean density over all 3D sites" in text and 0 < summary["plan_density"] <= 1
    from vdit_compile.eval.demo import fast_run_dir

    if fast_run_dir() is None:
        assert any("few-step weights are not shipped" in m for m in summary["missing"])
    else:
        assert any(c["name"].startswith("distilled") for c in summary["cards"]), [c["name"] for c in summary["cards"]]
    assert "demo finished" in text


def test_demo_options_reach_the_demo(monkeypatch):
    """--families and --step-ranges go to optimize through DemoOptions; --calib-steps defaults to --steps."""
    import vdit_compile.eval.demo as demo

    got = []
    monkeypatch.setattr(demo, "run_demo", lambda opts: got.append(opts))
    assert main(["demo", "--tiny", "--steps", "3", "--families", "tile, win3d", "--step-ranges", "2"]) == 0
    assert got[0].families == ("tile", "win3d") and got[0].step_ranges == 2 and got[0].calib_steps is None
    assert main(["demo", "--tiny", "--calib-steps", "2"]) == 0
    assert got[1].families is None and got[1].step_ranges == 1 and got[1].calib_steps == 2
