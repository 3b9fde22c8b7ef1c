"""Plan: JSON round trip, version/format refusal, compatibility errors, parametric-T use, plan show."""
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vdit_compile.calibration import CalibrationSettings, SiteCalibrator, build_plan
from vdit_compile.cli.main import main as cli_main
from vdit_compile.layout import TokenLayout
from vdit_compile.masks import TileMask
from vdit_compile.plans import (
    PLAN_VERSION,
    Plan,
    PlanError,
    PlanMismatchError,
    model_fingerprint,
    structure_summary,
)
from vdit_compile.plans.show import format_table


@dataclass
class Site:  # same fields as vdit_compile.passes.detect.AttentionSite
    name: str
    kind: str
    layout: TokenLayout | None
    num_heads: int
    head_dim: int = 8
    reason: str = ""


class Tiny(nn.Module):
    def __init__(self, width=8, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn1": nn.Linear(width, width), "attn2": nn.Linear(width, width)})
                                    for _ in range(layers))


LAYOUT = TokenLayout(4, 2, 2, 3, 0)


def _sites(layout=LAYOUT, layers=2):
    out = []
    for i in range(layers):
        out.append(Site(f"blocks.{i}.attn1", "joint_text_prefix", layout, 2))
        out.append(Site(f"blocks.{i}.attn2", "cross", None, 2, reason="cross-attention: keys are text"))
    return out


def _calibrated_plan(model, sites, budget=0.3):
    cals = {}
    g = torch.Generator().manual_seed(0)
    for s in sites:
        if s.layout is not None:
            cals[s.name] = cal = SiteCalibrator(s.name, s.layout, s.num_heads)
            q, k, v = (torch.randn(1, 2, s.layout.seq_len, 8, generator=g) for _ in range(3))
            cal.observe(q, k, v, 0.35)
    return build_plan(model, cals, CalibrationSettings(error_budget=budget, num_prompts=1, num_inputs=1), sites)


def test_round_trip_and_contents(tmp_path):
    model, sites = Tiny(), _sites()
    plan = _calibrated_plan(model, sites)
    path = plan.save(tmp_path / "p.json")
    d = json.loads(path.read_text())
    assert d["format"] == "vdit-compile-plan" and d["version"] == PLAN_VERSION
    assert d["model_class"].endswith("test_plan_format.Tiny") and d["fingerprint"].startswith("sha256:")
    assert d["calibration"]["error_budget"] == 0.3 and "g0w0" in d["calibration"]["candidates"]
    s0 = d["sites"][0]
    assert s0["layout"] == LAYOUT.to_dict() and len(s0["masks"]) == 2 and len(s0["frame_mass"][0]) == 5
    assert d["sites"][1]["status"] == "dense" and "cross" in d["sites"][1]["reason"]
    again = Plan.load(path)
    assert again.to_dict() == d
    again.check_compatible(model, sites)
    assert again.site("blocks.0.attn1").masks == plan.site("blocks.0.attn1").masks


def test_unknown_version_and_format_are_refused(tmp_path):
    d = Plan.uniform(_sites(), TileMask(1, 0)).to_dict()
    p = tmp_path / "p.json"
    p.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(PlanError, match="version 99.*reads versions 1, 2"):
        Plan.load(p)
    p.write_text(json.dumps({"sites": []}))
    with pytest.raises(PlanError, match="not a vdit-compile plan"):
        Plan.load(p)
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = {**d, "sites": [{**d["sites"][0], "masks": ["g1x0", "g0w0"]}]}
    with pytest.raises(PlanError, match="unknown mask .g1x0.: known families are"):
        Plan.from_dict(bad)


def test_mismatches_name_what_differs():
    model, sites = Tiny(), _sites()
    plan = _calibrated_plan(model, sites)
    with pytest.raises(PlanMismatchError, match="model class.*Tiny.*Linear"):
        plan.check_compatible(nn.Linear(8, 8))
    with pytest.raises(PlanMismatchError, match="structure fingerprint differs.*parameters 288 -> 1088"):
        plan.check_compatible(Tiny(width=16))
    with pytest.raises(PlanMismatchError) as ei:
        plan.check_compatible(model, _sites()[:2] + [Site("blocks.9.attn1", "video_self", LAYOUT, 2)])
    msg = str(ei.value)
    assert "not in the model: blocks.1.attn1" in msg and "not in the plan: blocks.9.attn1" in msg
    other = TokenLayout(4, 2, 3, 3, 0)
    with pytest.raises(PlanMismatchError, match=r"blocks.0.attn1: layout differs: width 2 in the plan, 3 now"):
        plan.check_compatible(model, _sites(layout=other))
    wrong_heads = [Site(s.name, s.kind, s.layout, 4) for s in sites]
    with pytest.raises(PlanMismatchError, match="2 heads in the plan, 4 now"):
        plan.check_compatible(model, wrong_heads)


def test_other_frame_count_applies_parametrically():
    plan = Plan.uniform(_sites(), TileMask(2, 1))
    plan.check_compatible(Tiny(), _sites(layout=LAYOUT.with_frames(9)))
    masks = plan.masks_for("blocks.0.attn1", LAYOUT.with_frames(9))
    assert masks == [TileMask(2, 1)] * 2
    assert plan.masks_for("blocks.0.attn2", LAYOUT) is None
    with pytest.raises(PlanMismatchError, match="text_prefix 3 in the plan, 5 now"):
        plan.masks_for("blocks.0.attn1", TokenLayout(4, 2, 2, 5, 0))
    dense = Plan.uniform(_sites(), TileMask(dense=True))
    assert not dense.tiled_sites()


def test_fingerprint_ignores_values_and_dtype_but_not_shapes():
    a, b = Tiny(), Tiny()
    assert model_fingerprint(a) == model_fingerprint(b.to(torch.bfloat16))
    assert model_fingerprint(a) != model_fingerprint(Tiny(layers=3))
    assert structure_summary(a)["parameters"] == 288


def test_plan_show_table_and_heatmaps(tmp_path, capsys):
    model, sites = Tiny(), _sites()
    path = _calibrated_plan(model, sites).save(tmp_path / "p.json")
    text = format_table(Plan.load(path))
    assert "blocks.0.attn1" in text and "text[3]+4x2x2(THW)" in text and "cross" in text
    rc = cli_main(["plan", "show", str(path), "--heatmaps", str(tmp_path / "maps")])
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 2 heatmap(s)" in out and "max error" in out
    pngs = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert pngs == ["blocks.0.attn1.png", "blocks.1.attn1.png"]
    assert (tmp_path / "maps" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text(json.dumps({"format": "vdit-compile-plan", "version": 0, "sites": []}))
    assert cli_main(["plan", "show", str(tmp_path / "bad.json")]) == 1
    assert "version 0" in capsys.readouterr().err
