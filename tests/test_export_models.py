"""Whole transformers exported to ONNX with sparse plans, run under ONNX Runtime against PyTorch.

The PyTorch side is the core's rewrite (``vdit_compile.optimize(model, plan=...)``), so the test
also cross-checks the export's own rewrite of the exported graph against the core's.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from vdit_compile import TileMask, inspect_model  # noqa: E402
from vdit_compile.export.check import check_export  # noqa: E402
from vdit_compile.export.errors import ShapeError  # noqa: E402
from vdit_compile.export.onnx import read_metadata, to_onnx  # noqa: E402
from vdit_compile.export.runner import OnnxRunner  # noqa: E402
from vdit_compile.plans import Plan, model_fingerprint  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from core_models import build_tiny  # noqa: E402
from test_export_translation import square_values  # noqa: E402

MIXED = [TileMask(1, 0), TileMask(0, 1)]  # two heads, two different masks


def _mixed_plan(model, inputs) -> Plan:
    plan = Plan.uniform(inspect_model(model, inputs), TileMask(1, 0), model)
    for site in plan.tiled_sites():
        site.masks = list(MIXED[: site.num_heads]) + [MIXED[0]] * max(0, site.num_heads - len(MIXED))
    return plan


def _embedded():
    from vdit_compile.models.embedded import load_pipeline

    pipe = load_pipeline(weights=None, tiny=True)
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 4, 16, 16, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, cfg.text_dim, generator=g))
    return pipe, inputs


def _assert_exported(res, plan, model, inputs, tmp_path):
    report = check_export(res.path, model, inputs, plan, program=res.program, repeats=1)
    assert report.ok, report.summary()
    assert "optimize" in report.reference  # compared with the core's rewrite, not with our own graph
    for name, fact in res.sites.items():
        lay = fact["layout"]
        if isinstance(lay["num_frames"], int):
            L = lay["text_prefix"] + lay["num_frames"] * lay["height"] * lay["width"] + lay["text_suffix"]
            assert square_values(str(res.path), L) == [], f"{name}: an L x L value in the graph"
    meta = read_metadata(res.path)
    assert meta["fingerprint"] == model_fingerprint(model) and meta["plan"]["sites"]
    assert [s["name"] for s in meta["inputs"]][:1] == ["hidden_states"] and res.outputs == ["sample"]
    return report


def test_embedded_model_exports_and_matches(tmp_path):
    pipe, inputs = _embedded()
    plan = _mixed_plan(pipe.transformer, inputs)
    res = to_onnx(pipe, inputs, tmp_path / "embedded.onnx", plan)  # a pipeline: its transformer is exported
    assert len(res.sites) == pipe.transformer.config.num_layers
    _assert_exported(res, plan, pipe.transformer, inputs, tmp_path)


def test_cogvideox_joint_text_attention(tmp_path):
    model, inputs = build_tiny("cogvideox")
    plan = _mixed_plan(model, inputs)
    res = to_onnx(model, inputs, tmp_path / "cog.onnx", plan, external_data=True)
    assert all(f["layout"]["text_prefix"] == 8 for f in res.sites.values())
    import onnx

    graph = onnx.load(str(res.path), load_external_data=False).graph  # weights beside the graph, as for > 2 GB models
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert res.external_data and len(external) > 10 and (tmp_path / "cog.onnx.data").stat().st_size > 100_000
    _assert_exported(res, plan, model, inputs, tmp_path)
    # CogVideoX rebuilds its position table from the frame count: the export says frames are fixed
    bad = dict(inputs, hidden_states=torch.randn(1, 5, *inputs["hidden_states"].shape[2:]))
    with pytest.raises(ShapeError, match="dimension 1 is fixed at 4"):
        OnnxRunner(res.path)(**bad)


def test_wan_mask_families_per_head_on_token_tiles(tmp_path, wan):
    """Window families (3D window, spatial window with a global frame) beside a frame tile head, on token tiles:
    the ONNX graph matches the core's rewrite (whose op is checked against each family's element oracle)."""
    from vdit_compile.export.plan_sites import resolve_plan
    from vdit_compile.masks import parse_mask

    model, inputs, _ = wan
    plan = resolve_plan(model, inputs, "win3d-t1h0w1")  # a family name, as `--plan win3d-t1h0w1` passes it
    names = ["win3d-t1h0w1", "spatial-h0w0-g1", "g1w0"]
    for site in plan.tiled_sites():
        assert site.tile is not None  # window families run on token tiles
        site.masks = [parse_mask(names[h % len(names)]) for h in range(site.num_heads)]
    res = to_onnx(model, inputs, tmp_path / "wan_families.onnx", plan)
    for fact in res.sites.values():
        assert fact["tile"] is not None and fact["masks"] == [names[h % len(names)] for h in range(len(fact["masks"]))]
    _assert_exported(res, plan, model, inputs, tmp_path)


@pytest.fixture(scope="module")
def wan():
    model, inputs = build_tiny("wan")
    return model, inputs, _mixed_plan(model, inputs)


def test_wan_dynamic_frames(tmp_path, wan):
    model, inputs, plan = wan
    res = to_onnx(model, inputs, tmp_path / "wan.onnx", plan, dynamic_frames=True, max_frames=16)
    frames = res.inputs[0]["shape"][2]
    assert isinstance(frames, dict) and (frames["min"], frames["max"]) == (2, 16)  # g = 1 -> at least 2 frames
    for n in (inputs["hidden_states"].shape[2], 7):
        report = check_export(res.path, model, inputs, plan, program=res.program, repeats=1, frames=(2, n))
        assert report.ok, report.summary()
    with pytest.raises(ShapeError, match="dimension 2 \\(frames\\) must be in 2"):
        OnnxRunner(res.path)(**dict(inputs, hidden_states=torch.randn(1, 6, 1, 8, 8)))
    with pytest.raises(ShapeError, match="dimension 3 is fixed at 8"):
        OnnxRunner(res.path)(**dict(inputs, hidden_states=torch.randn(1, 6, 4, 10, 8)))


def test_custom_op_export_and_overwrite(tmp_path, wan):
    from vdit_compile.export.errors import ExportError

    model, inputs, plan = wan
    path = tmp_path / "wan_custom.onnx"
    res = to_onnx(model, inputs, path, plan, attention="custom")
    import onnx

    nodes = [n for n in onnx.load(str(res.path)).graph.node if n.domain == "vdit"]
    assert len(nodes) == len(res.sites)
    with pytest.raises(ExportError, match="already exists"):
        to_onnx(model, inputs, path, plan)
    with pytest.raises(ExportError, match="no plan"):
        to_onnx(model, inputs, tmp_path / "other.onnx")


def test_frame_bound_suggestion_is_parsed():
    from vdit_compile.export.graph import suggested_range

    msg = "Suggested fixes:\n  latent_frames = Dim('latent_frames', max=32)"
    assert suggested_range(msg, "latent_frames") == (None, 32)
    assert suggested_range("Suggested fixes: latent_frames = Dim('latent_frames', min=3, max=9)", "latent_frames") == (3, 9)
    assert suggested_range("nothing", "latent_frames") is None


def test_per_call_text_sites_stay_dense_in_export(tmp_path, caplog):
    """Mochi trims its text by value (layout text[*]): export must keep those sites dense (exact), with a warning,
    not tile them with text length 0 (which treated the text tokens as video: silently wrong)."""
    import logging

    model, inputs = build_tiny("mochi")
    plan = Plan.uniform(inspect_model(model, inputs), TileMask(0, 0), model)
    dynamic = [s.name for s in plan.tiled_sites() if getattr(s.layout, "dynamic_text", "")]
    assert dynamic, "the tiny Mochi should have per-call text sites"
    with caplog.at_level(logging.WARNING, logger="vdit_compile.export.graph"):
        res = to_onnx(model, inputs, tmp_path / "mochi.onnx", plan)
    assert all("dense" in res.sites[name] for name in dynamic)
    assert any("left dense" in r.getMessage() for r in caplog.records)
    runner = OnnxRunner(res.path)
    with torch.no_grad():
        want = model(**inputs)
    want = want[0] if isinstance(want, (tuple, list)) else getattr(want, "sample", want)
    got = torch.as_tensor(runner(**{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})[res.outputs[0]])
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-4
