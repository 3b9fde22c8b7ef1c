"""The textured world: data determinism and shapes, captions <-> attributes, a tiny training run and its resume,
loading by world name, and the classifier tool on it (all CPU, tiny sizes)."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vdit_compile.models import textured
from vdit_compile.models.textured import data
from vdit_compile.models.worlds import scored_attributes, world_data

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_clips_are_deterministic_textured_and_4096_tokens():
    v1 = data.sample_batch(seeds=[3, 11])[0]
    v2 = data.sample_batch(seeds=[3, 11])[0]
    assert v1.shape == (2, 16, 3, 64, 64) and v1.dtype == torch.float32
    assert torch.equal(v1, v2)
    assert torch.equal(data.sample_clip(11)[0], v1[1])  # batched == single
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    cfg = textured.TRANSFORMER_CONFIG
    tokens = 16 // cfg["patch_size"][0] * (64 // cfg["patch_size"][1]) * (64 // cfg["patch_size"][2])
    assert tokens == 4096
    # textured: neighbouring pixels of the background differ (no flat fill), and another seed gives another texture
    assert float((v1[:, :, :, :, 1:] - v1[:, :, :, :, :-1]).abs().mean()) > 0.01
    assert not torch.equal(v1[0], v1[1])


def test_background_drifts_with_its_caption():
    """A 'drifting right' background at frame t+1 is frame t shifted right by PAN_SPEED pixels (away from objects)."""
    for seed in range(200):
        a = data.sample_attributes(seed)
        if a["pan"] == "right":
            break
    v = data.render([dict(a, size="small", second=None, lane=0, jitter_x=0.0, jitter_y=0.0)])[0]
    row0, row1 = v[4, :, 2, 8:40], v[5, :, 2, 8:40]  # top rows: no object there
    shift = int(data.PAN_SPEED)
    assert torch.allclose(row1[:, shift:], row0[:, :-shift], atol=2e-3)
    assert not torch.allclose(row1, row0, atol=2e-3)


def test_captions_round_trip_and_name_what_is_scored():
    for seed in range(300):
        a = data.sample_attributes(seed)
        cap = data.caption_of(a)
        p = data.parse_caption(cap)
        for k in ("shape", "colour", "texture", "size", "motion", "background", "background_texture", "pan"):
            assert p[k] == a[k], (seed, k, cap)
        assert (p["second"] is None) == (a["second"] is None)
        assert len(cap.split()) <= data.MAX_CAPTION_WORDS
        assert set(cap.split()) <= set(data.VOCAB)
    assert set(scored_attributes("textured")) == {"shape", "colour", "motion", "texture", "pan"}
    assert world_data("textured") is data
    with pytest.raises(ValueError, match="texture"):
        data.parse_caption("a large red wavy square moving left over a black mottled background")
    for p in data.GRID_PROMPTS:
        data.canonical_attributes(p)  # every grid prompt parses


def test_tiny_training_two_steps_then_resume(tmp_path):
    tr = _script("train_reference")

    def args(out, steps):
        return ["--world", "textured", "--tiny", "--device", "cpu", "--no-compile", "--out", str(out), "--steps",
                str(steps), "--batch", "1", "--log-every", "1", "--sample-steps", "0", "--warmup", "1"]

    assert tr.main(args(tmp_path / "a", 1)) == 0
    assert tr.main(args(tmp_path / "a", 2) + ["--resume"]) == 0
    tr = _script("train_reference")
    assert tr.main(args(tmp_path / "b", 2)) == 0
    with open(tmp_path / "a" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    ra = load_file(str(tmp_path / "a" / "ckpt" / "model.safetensors"))
    rb = load_file(str(tmp_path / "b" / "ckpt" / "model.safetensors"))
    for k in ra:
        assert torch.allclose(ra[k], rb[k], atol=1e-6), k
    assert (tmp_path / "a" / "loss.png").is_file()
    pipe = textured.load_pipeline(weights=tmp_path / "a" / "weights")
    assert type(pipe).__name__ == "TexturedPipeline" and pipe.scheduler.config.shift == 3.0
    out = pipe(data.GRID_PROMPTS[0], num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.frames.shape == (1, 16, 3, 64, 64)
    from vdit_compile.models.embedded import load_pipeline as load_embedded_pipeline
    with pytest.raises(ValueError, match="vdit-embedded-v1|world"):  # a textured run is not an embedded model
        textured.load_pipeline(weights=ROOT / "vdit_compile" / "models" / "embedded" / "weights")
    assert load_embedded_pipeline is not None


def test_missing_shipped_weights_say_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(textured, "WEIGHTS_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="train_reference.py --world textured"):
        textured.load_pipeline()


def test_shipped_weights_and_classifier_load_within_25_mb():
    """The package ships the textured world's model (fp16 EMA of a training run, with its provenance) and the
    scorecard's classifier (pan measured from the pixels) in vdit_compile/models/textured/weights/, 25 MB at most."""
    import json

    from vdit_compile.eval.classifier import load_classifier

    assert textured.weights_available(), "the textured weights must ship in vdit_compile/models/textured/weights/"
    files = list(textured.WEIGHTS_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    cfg = json.loads((textured.WEIGHTS_DIR / "config.json").read_text())
    # provenance: a finished run records its steps; weights written from a checkpoint its checkpoint_step
    assert cfg["world"] == "textured" and cfg["training"].get("checkpoint_step", cfg["training"].get("steps", 0)) > 0
    pipe = textured.load_pipeline()
    assert pipe.transformer.config.num_layers == textured.TRANSFORMER_CONFIG["num_layers"]
    f = pipe(data.GRID_PROMPTS[0], num_inference_steps=1, generator=torch.Generator().manual_seed(0), num_frames=2,
             progress=False).frames
    assert f.shape == (1, 2, 3, data.HEIGHT, data.WIDTH) and torch.isfinite(f).all()
    clf = load_classifier(world="textured")
    assert clf.meta.get("measured", {}).get("pan") == "background_drift"
    assert set(scored_attributes("textured")) <= set(clf.meta["attributes"])


def test_classifier_tool_on_the_textured_world(tmp_path):
    tc = _script("train_classifier")
    assert tc.main(["--world", "textured", "--steps", "2", "--pool", "8", "--refresh", "1", "--batch", "4",
                    "--eval-clips", "4", "--width", "4", "--out", str(tmp_path)]) == 0
    from vdit_compile.eval.classifier import load_classifier
    clf = load_classifier(tmp_path, world="textured")
    assert clf.size == 64 and set(clf.attributes) == set(scored_attributes("textured"))
    assert clf.meta["world"] == "textured"
    pred = clf.predict(data.sample_batch(seeds=[1])[0])
    assert set(pred) == set(scored_attributes("textured"))


def test_oracle_finds_local_heads_sparse_and_diffuse_heads_dense():
    """world_report's oracle on hand-made q, k, v: a head attending only to itself needs only the sparsest
    window holding the diagonal; a head attending uniformly to random values needs dense attention."""
    wr = _script("world_report")
    T, H, W = 4, 4, 4
    L = T * H * W
    g = torch.Generator().manual_seed(0)
    eye = 30.0 * torch.eye(L)
    q = torch.stack([eye, torch.zeros(L, L)])[None]  # (B=1, heads=2, L, d=L)
    v = torch.randn(1, 2, L, L, generator=g)
    res, mass, dens = wr.oracle_and_maps([(q, q.clone(), v)], n_sites=1, heads=2, grid=(T, H, W), budget=0.05,
                                         device="cpu")
    picks = res["max-err<=0.05 dense+tile+spatial+3d"]["per_head"][0]
    assert dens[picks[1]] == 1.0  # dense (or a candidate that is all-true at this small grid)
    assert dens[picks[0]] == min(d for n, d in dens.items()), picks
    expected = (dens[picks[0]] + 1.0) / 2
    assert abs(res["max-err<=0.05 dense+tile+spatial+3d"]["mean_density"] - round(expected, 4)) < 1e-4
    assert res["max-err<=0.05 dense+tile"]["per_head"][0][0] == "tile g0w0"  # the sparsest tile holding the diagonal
    assert float(mass[0, 0, 0, 0]) > 0.99  # head 0's mass: |dt| = 0, distance 0
    assert abs(float(mass[0, 1].sum()) - 1.0) < 1e-5 and float(mass[0, 1, 0, 0]) < 0.05
    wm = wr.window_mass(mass, (T, H, W))
    assert abs(wm["t1 r1"]["density"] - dens["3d t1 r1"]) < 1e-4  # the yardstick is the mask's density
    assert wm["t1 r1"]["mass"][0][0] > 0.99


def test_model_spec_and_demo_select_the_textured_world(tmp_path, monkeypatch, capsys):
    from vdit_compile.cli.main import main as cli_main
    from vdit_compile.cli.model_spec import ModelSpecError, load_model
    from vdit_compile.models.worlds import world_of_pipe

    pipe = load_model("textured:tiny")
    assert type(pipe).__name__ == "TexturedPipeline" and world_of_pipe(pipe) == "textured"
    assert pipe.transformer.config.patch_size == (1, 4, 4)
    with pytest.raises(ModelSpecError, match="textured:WEIGHTS_DIR"):
        load_model("textured:nonsense")
    monkeypatch.setattr(textured, "WEIGHTS_DIR", tmp_path / "none")
    with pytest.raises(ModelSpecError, match="not shipped yet"):
        load_model("textured")
    assert cli_main(["demo", "--world", "textured", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 2
    assert "train_reference.py --world textured" in capsys.readouterr().err


def test_world_report_scores_each_guidance_on_the_same_prompts(tmp_path):
    """``tools/world_report.py --guidance A B``: one scorecard per scale (the first also as scorecard.json), each
    sampled with its own scale, and the per-scale accuracies in the summary."""
    import json

    wr = _script("world_report")
    assert wr.main(["--world", "textured", "--prompts", "1", "--steps", "1", "--batch", "1", "--guidance", "1", "4",
                    "--oracle-prompts", "0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    cards = {g: json.loads((tmp_path / f"scorecard-g{g}.json").read_text()) for g in ("1", "4")}
    assert [cards[g]["settings"]["guidance"] for g in ("1", "4")] == [1.0, 4.0]
    assert json.loads((tmp_path / "scorecard.json").read_text())["settings"]["guidance"] == 1.0
    summary = json.loads((tmp_path / "report_summary.json").read_text())
    assert set(summary["scorecard_by_guidance"]) == {"1", "4"}
    assert summary["scorecard_by_guidance"]["4"]["accuracy"] == cards["4"]["accuracy"]


def test_top_mass_bound_keeps_the_fewest_keys_holding_the_share():
    """world_report's top-mass bound: a head attending only to itself keeps one key per query; a head with
    uniform attention keeps every key (no subset holds the mass without error); and on random scores the kept
    set per query is, by brute force, the shortest prefix of the keys sorted by weight whose mass reaches the
    share, with the error of the renormalised output computed independently in float64."""
    wr = _script("world_report")
    L, D = 24, 8
    g = torch.Generator().manual_seed(1)
    eye = 40.0 * torch.eye(L)
    q = torch.stack([eye, torch.zeros(L, L)])[None]  # (B=1, heads=2, L, L)
    v = torch.randn(1, 2, L, L, generator=g)
    tm = wr.top_mass_oracle([(q, q.clone(), v)], n_sites=1, heads=2, budget=0.05, device="cpu")
    assert tm["per_head"][0][0]["density"] == round(1 / L, 4) and tm["per_head"][0][1]["density"] == 1.0
    assert abs(tm["mean_density"] - (1 / L + 1.0) / 2) < 1e-3

    q, k, v = (torch.randn(2, 1, L, D, generator=g) for _ in range(3))
    tm = wr.top_mass_oracle([(q, k, v)], n_sites=1, heads=1, budget=1.0, device="cpu", shares=(0.6, 0.9))
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * D ** -0.5, -1)[:, 0]
    ref = p @ v.double()[:, 0]
    for j, tau in enumerate((0.6, 0.9)):
        keep = torch.zeros_like(p, dtype=torch.bool)
        for b in range(2):
            for i in range(L):
                order, total = p[b, i].argsort(descending=True).tolist(), 0.0
                for key in order:
                    keep[b, i, key] = True
                    total += float(p[b, i, key])
                    if total >= tau:
                        break
        pk = p * keep
        out = (pk @ v.double()[:, 0]) / pk.sum(-1, keepdim=True)
        err = max(float((out[b] - ref[b]).norm() / ref[b].norm()) for b in range(2))
        assert abs(tm["density"][j][0][0] - float(keep.double().mean())) < 1e-9
        assert abs(tm["mean_err"][j][0][0] - err) < 1e-4
    assert tm["per_head"][0][0]["share"] == 0.6  # budget 1.0: the smallest share
