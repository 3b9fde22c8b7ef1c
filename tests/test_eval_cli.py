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
    args = ["demo", "--tiny", "--steps", "5", "--prompts", "2", "--calib-prompts", "1", "--calib-steps", "1",
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
        names = [c["name"] for c in summary["cards"]]
        assert names[:3] == ["dense (reference)", "tile-sparse", "tile-sparse + taylorseer cache"], names
        # taylorseer at its defaults on 5 steps: steps 0-2 (warm-up) and 4 evaluated, step 3 forecast; 2 videos
        lat = summary["latency"]
        assert (lat["cached_calls"], lat["cached_evaluations"]) == (10, 8), lat
        assert "8 of 10 transformer calls evaluated" in text and lat["cached_speedup"] > 0
        assert "blocks.0.attn1" in text
        assert "mean density over all 3D sites" in text and 0 < summary["plan_density"] <= 1
        check = summary["output_check"]  # the demo's output check ran on the calibration prompt and says so
        assert check["target_psnr"] == 34.0 and check["trials"] and "output check (calibration samples" in text
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
    assert got[1].cache == "taylorseer" and got[1].cache_interval is None  # the best training-free setting by default
    assert main(["demo", "--tiny", "--cache", "none"]) == 0 and got[2].cache is None
    assert main(["demo", "--tiny", "--cache-interval", "3"]) == 0 and got[3].cache_interval == 3
    assert got[3].cost_model == "auto"
    assert main(["demo", "--tiny", "--cost-model", "always"]) == 0 and got[4].cost_model == "always"


def test_demo_output_check_and_tile_options(monkeypatch, capsys):
    """--output-psnr (default 34 dB; 0 turns the check off; negative or inf refused) and --tile-tokens reach the demo."""
    import vdit_compile.eval.demo as demo

    got = []
    monkeypatch.setattr(demo, "run_demo", lambda opts: got.append(opts))
    assert main(["demo", "--tiny"]) == 0 and got[0].output_psnr == 34.0 and got[0].tile_tokens is None
    assert main(["demo", "--tiny", "--output-psnr", "30", "--tile-tokens", "16"]) == 0
    assert got[1].output_psnr == 30.0 and got[1].tile_tokens == 16
    assert main(["demo", "--tiny", "--output-psnr", "0"]) == 0 and got[2].output_psnr is None
    for bad, why in (("-1", "must be >= 0, found -1.0"), ("inf", "must be finite, found inf"),
                     ("nan", "must be a number, found NaN")):
        assert main(["demo", "--tiny", "--output-psnr", bad]) == 2
        assert f"--output-psnr (dB; 0: off) {why}" in capsys.readouterr().err
    assert len(got) == 3


def test_demo_cache_interval_needs_taylorseer(capsys):
    assert main(["demo", "--tiny", "--cache", "fbc", "--cache-interval", "3"]) == 2
    assert "--cache-interval is taylorseer's interval" in capsys.readouterr().err
