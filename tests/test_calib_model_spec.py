"""MODEL specs of the CLI: every accepted form, and clear errors for the rest."""
import json
from pathlib import Path

import pytest
import torch

from vdit_compile.cli.model_spec import (
    ModelSpecError,
    load_example_inputs,
    load_input_list,
    load_model,
    load_model_and_inputs,
)

HELPERS = str(Path(__file__).with_name("calib_helpers.py"))


def test_file_factory_with_example_inputs():
    model, example = load_model_and_inputs(f"{HELPERS}:tiny_wan")
    assert type(model).__name__ == "WanTransformer3DModel" and not model.training
    assert set(example) >= {"hidden_states", "timestep", "encoder_hidden_states"}
    out = model(**example)[0]
    assert out.shape == example["hidden_states"].shape


def test_module_factory(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(HELPERS).parent))
    model = load_model("calib_helpers:tiny_wan_module")
    assert type(model).__name__ == "WanTransformer3DModel"


def test_diffusers_class_and_config_forms(tmp_path):
    ref = load_model(f"{HELPERS}:tiny_wan_module")
    ref.save_config(tmp_path)
    cfg = tmp_path / "config.json"
    a = load_model(f"WanTransformer3DModel:{cfg}")
    b = load_model(str(cfg))
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(a) == shapes(b) == shapes(ref)
    with pytest.raises(ModelSpecError, match="no weights.*WanTransformer3DModel:"):
        load_model(str(tmp_path))
    ref.save_pretrained(tmp_path / "pre")
    c = load_model(str(tmp_path / "pre"))
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), ref.parameters()))


@pytest.mark.parametrize("spec, match", [
    ("", "empty model spec"),
    ("no/such/path", "cannot interpret model spec"),
    ("NoSuchDiffusersClass:cfg.json", "does not exist"),
    ("vdit_compile_no_such_module:make", "cannot import module"),
    ("embedded:huge", "unknown embedded variant"),
    (f"{HELPERS}:missing", "no callable 'missing'"),
    (f"{HELPERS}:not_a_model", "returned int"),
])
def test_errors(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_model(spec)


def test_more_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"num_layers": 1}))
    with pytest.raises(ModelSpecError, match="diffusers has no class 'NoSuchClass'"):
        load_model(f"NoSuchClass:{cfg}")
    with pytest.raises(ModelSpecError, match="no '_class_name'"):
        load_model(str(cfg))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="neither model_index.json"):
        load_model(str(tmp_path / "empty"))
    torch.save([{"x": torch.ones(1)}, {"x": torch.zeros(1)}], tmp_path / "in.pt")
    assert len(load_input_list(tmp_path / "in.pt")) == 2 and load_example_inputs(tmp_path / "in.pt")["x"].item() == 1
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ModelSpecError, match="must hold a dict"):
        load_input_list(tmp_path / "bad.pt")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_input_list(tmp_path / "none.pt")
