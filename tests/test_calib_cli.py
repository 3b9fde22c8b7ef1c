"""CLI inspect / calibrate / plan show on tiny models, and pipeline input capture."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vdit_compile.calibration.inputs import capture_transformer_inputs, read_prompts
from vdit_compile.cli.main import main as cli
from vdit_compile.plans import Plan

HELPERS = str(Path(__file__).with_name("calib_helpers.py"))


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **extra):
        return self.lin(hidden_states) * timestep


class _Pipe:
    """Calls its transformer positionally (as some pipelines do) once per step."""

    def __init__(self):
        self.transformer = _Transformer()

    def __call__(self, prompt, num_inference_steps=2, generator=None, output_type="pil", scale=1.0):
        self.last_output_type = output_type
        x = torch.randn(1, 3, generator=generator, requires_grad=True)
        for i in range(num_inference_steps):
            x = self.transformer(x, torch.tensor(float(i)), torch.ones(2) * len(prompt), flag=scale)
        return x


def test_capture_names_positional_args_detaches_and_removes_the_hook():
    pipe = _Pipe()
    recs = capture_transformer_inputs(pipe, ["ab", "abc"], num_inference_steps=3, progress=False, scale=2.0)
    assert len(recs) == 6 and pipe.last_output_type == "latent"
    assert set(recs[0]) == {"hidden_states", "timestep", "encoder_hidden_states", "flag"}
    assert recs[0]["flag"] == 2.0 and recs[4]["encoder_hidden_states"].tolist() == [3.0, 3.0]
    assert [r["timestep"].item() for r in recs] == [0, 1, 2, 0, 1, 2]
    assert not any(r["hidden_states"].requires_grad for r in recs)
    assert not pipe.transformer._forward_pre_hooks
    # deterministic per-prompt seeds: prompt i -> seed + i
    again = capture_transformer_inputs(pipe, ["ab"], num_inference_steps=1, progress=False, seed=1)
    assert torch.equal(again[0]["hidden_states"], recs[3]["hidden_states"])
    sub = capture_transformer_inputs(pipe, ["ab", "abc"], num_inference_steps=3, every=2, max_calls=2, progress=False)
    assert [r["timestep"].item() for r in sub] == [0, 2]
    with pytest.raises(TypeError, match="pipeline with a .transformer"):
        capture_transformer_inputs(object(), ["x"])
    with pytest.raises(ValueError, match="at least one prompt"):
        capture_transformer_inputs(pipe, [])


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na red circle\n\n  a blue square  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    (tmp_path / "e.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")


def test_inspect_module(capsys):
    assert cli(["inspect", f"{HELPERS}:tiny_wan", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in sites] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert [s["kind"] for s in sites] == ["video_self", "cross"] * 2
    assert sites[0]["layout"] == {"num_frames": 5, "height": 4, "width": 4, "text_prefix": 0, "text_suffix": 0,
                                  "order": "THW"}
    assert cli(["inspect", f"{HELPERS}:tiny_wan_module"]) == 1
    assert "bare module: pass --inputs" in capsys.readouterr().err


def test_calibrate_module_then_apply_plan(tmp_path, capsys):
    from calib_helpers import tiny_wan_module, wan_inputs

    import vdit_compile

    inputs = tmp_path / "inputs.pt"
    torch.save([wan_inputs(seed=1), wan_inputs(seed=2)], inputs)
    out = tmp_path / "plan.json"
    rc = cli(["calibrate", f"{HELPERS}:tiny_wan_module", "--inputs", str(inputs), "-o", str(out),
              "--budget", "0.5", "--candidates", "g0w0,g1w0,g1w1,dense", "--heatmaps", str(tmp_path / "maps")])
    text = capsys.readouterr().out
    assert rc == 0 and "plan written to" in text and "2 transformer call(s)" in text
    plan = Plan.load(out)
    assert plan.calibration["candidates"] == ["g0w0", "g1w0", "g1w1", "dense"]
    assert plan.calibration["num_inputs"] == 2 and plan.calibration["error_budget"] == 0.5
    site = plan.site("blocks.0.attn1")
    assert site.layout.describe() == "5x4x4(THW)" and len(site.masks) == 2 and len(site.frame_mass[0]) == 6
    for h, (e, m) in enumerate(zip(site.errors, site.masks)):
        assert e <= 0.5 and e == pytest.approx(site.candidate_errors[m.name][h], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["blocks.0.attn1.png", "blocks.1.attn1.png"]
    # the plan fits the model it was made for (and optimize applies it) but not another config
    model = tiny_wan_module()
    vdit_compile.optimize(model, plan=str(out), config=vdit_compile.config.OptimizeConfig(progress=False))
    vdit_compile.restore(model)
    from calib_helpers import WAN_CONFIG
    from diffusers import WanTransformer3DModel

    other = WanTransformer3DModel(**{**WAN_CONFIG, "num_layers": 3})
    with pytest.raises(ValueError, match="structure fingerprint differs"):
        vdit_compile.optimize(other, plan=str(out))


def test_calibrate_pipeline_and_errors(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square bouncing\n")
    out = tmp_path / "plan.json"
    kw = json.dumps({"num_frames": 4, "height": 16, "width": 16})
    rc = cli(["calibrate", f"{HELPERS}:tiny_pipeline", "--prompts", str(prompts), "-o", str(out), "--steps", "2",
              "--pipe-kwargs", kw, "--max-density", "0.6"])
    assert rc == 0, capsys.readouterr().err
    plan = Plan.load(out)
    assert plan.calibration["num_prompts"] == 2 and plan.calibration["num_inference_steps"] == 2
    assert plan.calibration["num_inputs"] == 4 and plan.calibration["max_density"] == 0.6
    tiled = plan.tiled_sites()
    assert tiled and all(d <= 0.6 for s in tiled for d in s.densities)
    assert all(s.layout.num_frames == 4 for s in tiled)
    capsys.readouterr()
    assert cli(["calibrate", f"{HELPERS}:tiny_pipeline", "-o", str(out)]) == 1
    assert "pass --prompts FILE" in capsys.readouterr().err
    assert cli(["calibrate", f"{HELPERS}:tiny_wan", "--prompts", str(prompts), "-o", str(out)]) == 1
    assert "bare module, not a pipeline" in capsys.readouterr().err
    assert cli(["calibrate", f"{HELPERS}:tiny_wan", "--candidates", "g1x2", "-o", str(out)]) == 1
    assert "unknown mask 'g1x2'" in capsys.readouterr().err


def test_frame_local_model_gets_sparse_masks_at_the_default_budget(tmp_path, capsys):
    """End to end: capture -> calibrate -> plan -> apply, on a model whose attention is frame-local."""
    from calib_helpers import frame_local_dit

    import vdit_compile

    out = tmp_path / "plan.json"
    # frame tiles only (--families): values are near-constant inside a frame, so with every family a sub-frame
    # window is sparser still within the budget; the frame tile answer is the one this model pins down
    assert cli(["calibrate", f"{HELPERS}:frame_local_dit", "-o", str(out), "--families", "tile"]) == 0
    plan = Plan.load(out)
    (site,) = plan.tiled_sites()
    assert [m.name for m in site.masks] == ["g0w0", "g0w0"] and max(site.errors) < 1e-4
    assert site.density == pytest.approx(1 / 5)
    fm = torch.tensor(site.frame_mass)
    assert torch.diagonal(fm[:, :5, :5], dim1=1, dim2=2).min() > 0.999
    model, inputs = frame_local_dit()
    ref = model(**inputs)
    vdit_compile.optimize(model, plan=str(out), config=vdit_compile.config.OptimizeConfig(progress=False))
    with torch.profiler.profile() as prof:
        got = model(**inputs)
    vdit_compile.restore(model)
    assert any("tile_attention" in e.name for e in prof.events())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_inspect_gets_pipeline_inputs_from_one_step():
    from argparse import Namespace

    from vdit_compile.cli.cmd_inspect import example_inputs_for

    pipe = _Pipe()
    args = Namespace(model="toy", prompt="abcd", pipe_kwargs='{"scale": 3.0}', device="cpu", dtype=None)
    kw = example_inputs_for(pipe, None, args)
    assert kw["flag"] == 3.0 and kw["encoder_hidden_states"].tolist() == [4.0, 4.0] and kw["timestep"].item() == 0
    given = {"hidden_states": torch.ones(2)}
    assert example_inputs_for(pipe, given, Namespace(**{**vars(args), "dtype": "bf16"}))["hidden_states"].dtype == torch.bfloat16
