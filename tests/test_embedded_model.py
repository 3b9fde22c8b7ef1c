"""Tokenizer, text encoder and pipeline of the embedded model (random init, tiny config: CPU-fast)."""
import pytest
import torch

from vdit_compile.models.embedded import (
    CaptionTokenizer,
    EmbeddedPipeline,
    data,
    load_pipeline,
    read_config,
    save_embedded,
    weights_available,
)
from vdit_compile.models.embedded.pipeline import save_gif

PROMPT = "a small red circle moving left slowly over a dark blue background"


def test_tokenizer_round_trip_and_padding():
    tok = CaptionTokenizer()
    assert set(data.VOCAB) <= set(tok.vocab)
    ids, mask = tok([PROMPT, ""])
    assert ids.shape == (2, tok.max_length) and ids.dtype == torch.long
    assert int(mask[0].sum()) == len(PROMPT.split()) and not mask[1].any()
    assert tok.decode(ids[0]) == PROMPT


def test_tokenizer_unknown_words_error_by_default_unk_on_request():
    tok = CaptionTokenizer()
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['purple'\]"):
        tok("a small purple circle moving left slowly over a black background")
    ids, mask = tok("a small purple circle", unknown="unk")
    assert ids[0, 2].item() == tok.unk_id and mask[0, 2]
    with pytest.raises(ValueError, match="at most"):
        tok(" ".join(["a"] * (tok.max_length + 1)))


def test_text_encoder_zeroes_padding_and_null_prompt():
    pipe = load_pipeline(weights=None, tiny=True)
    feats = pipe.encode_prompt([PROMPT, ""])
    n = len(PROMPT.split())
    assert feats.shape[:2] == (2, pipe.tokenizer.max_length)
    assert torch.all(feats[0, n:] == 0) and torch.all(feats[1] == 0)
    assert feats[0, :n].abs().sum() > 0 and torch.isfinite(feats).all()


def test_pipeline_round_trip_random_init_is_deterministic():
    pipe = load_pipeline(weights=None, tiny=True)
    assert isinstance(pipe, EmbeddedPipeline)

    def run(seed, scale):
        g = torch.Generator().manual_seed(seed)
        return pipe([PROMPT, PROMPT], num_inference_steps=2, guidance_scale=scale, generator=g, num_frames=4,
                    progress=False).frames

    a, b, c = run(0, 2.0), run(0, 2.0), run(1, 2.0)
    assert a.shape == (2, 4, 3, data.HEIGHT, data.WIDTH) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # one generator draws different noise for each clip
    assert run(0, 1.0).shape == a.shape  # guidance 1 runs without the null prompt
    with pytest.raises(ValueError, match="multiples of the patch size"):
        pipe(PROMPT, num_inference_steps=1, height=30, progress=False)


def test_save_load_round_trip_and_gif(tmp_path):
    pipe = load_pipeline(weights=None, tiny=True, seed=3)
    save_embedded(tmp_path / "w", pipe.transformer, pipe.text_encoder, pipe.tokenizer, guidance_scale=2.5,
                  dtype=torch.float32)
    assert read_config(tmp_path / "w")["default_guidance_scale"] == 2.5
    back = load_pipeline(weights=tmp_path / "w")
    assert back.default_guidance_scale == 2.5
    for (k, v), (k2, v2) in zip(pipe.transformer.state_dict().items(), back.transformer.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    g = torch.Generator().manual_seed(0)
    f1 = pipe(PROMPT, num_inference_steps=1, guidance_scale=2.5, generator=g, num_frames=4, progress=False).frames
    f2 = back(PROMPT, num_inference_steps=1, generator=g.manual_seed(0), num_frames=4, progress=False).frames  # default 2.5
    assert torch.allclose(f1, f2, atol=1e-5)
    path = save_gif(f1, tmp_path / "x.gif")
    assert (tmp_path / "x.gif").stat().st_size > 100 and path.endswith("x.gif")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pipeline(weights=tmp_path / "missing")


def test_shipped_weights_load():
    assert weights_available(), "the embedded weights must ship in vdit_compile/models/embedded/weights/"
    import os

    from vdit_compile.models.embedded import WEIGHTS_DIR

    size = sum(os.path.getsize(WEIGHTS_DIR / f) for f in os.listdir(WEIGHTS_DIR))
    assert size <= 25 * 2**20
    pipe = load_pipeline()
    cfg = read_config(WEIGHTS_DIR)
    assert cfg["training"]["steps"] > 0
    f = pipe(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0), num_frames=4,
             progress=False).frames
    assert f.shape == (1, 4, 3, data.HEIGHT, data.WIDTH) and torch.isfinite(f).all()
