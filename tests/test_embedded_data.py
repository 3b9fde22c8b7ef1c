"""Procedural data: determinism, caption <-> attribute agreement, batched == single, value range."""
import pytest
import torch

from vdit_compile.models.embedded import data


def test_same_seed_same_clip_and_different_seeds_differ():
    v1, c1, a1 = data.sample_clip(123)
    v2, c2, a2 = data.sample_clip(123)
    assert torch.equal(v1, v2) and c1 == c2 and a1 == a2
    v3, c3, _ = data.sample_clip(124)
    assert not torch.equal(v1, v3)
    assert v1.shape == (data.NUM_FRAMES, 3, data.HEIGHT, data.WIDTH) and v1.dtype == torch.float32
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0


def test_batch_matches_single_clips():
    seeds = [5, 17, 99, 1000]
    videos, captions, attrs = data.sample_batch(seeds=seeds)
    for i, s in enumerate(seeds):
        v, c, a = data.sample_clip(s)
        assert torch.allclose(videos[i], v, atol=1e-6)
        assert captions[i] == c and attrs[i] == a


def test_generator_batches_are_reproducible():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    v1, c1, _ = data.sample_batch(batch=3, generator=g1)
    v2, c2, _ = data.sample_batch(batch=3, generator=g2)
    assert torch.equal(v1, v2) and c1 == c2
    with pytest.raises(ValueError, match="seeds"):
        data.sample_batch()


def test_captions_match_attributes_and_use_vocab():
    vocab = set(data.VOCAB)
    motions, shapes = set(), set()
    for seed in range(400):
        a = data.sample_attributes(seed)
        cap = data.caption_of(a)
        assert set(cap.split()) <= vocab
        p = data.parse_caption(cap)
        for k in ("shape", "colour", "size", "motion", "speed", "background", "texture"):
            assert p[k] == a[k]
        assert (p["second"] is None) == (a["second"] is None)
        assert f"{a['colour']} {a['shape']}" in cap and a["background"] in cap
        if a["motion"] == "rotate":
            assert a["shape"] != "circle"
        motions.add(a["motion"])
        shapes.add(a["shape"])
    assert motions == set(data.MOTIONS) and shapes == set(data.SHAPES)


def test_parse_caption_rejects_bad_words():
    with pytest.raises(ValueError, match="colour"):
        data.parse_caption("a small purple circle moving left slowly over a black background")


def test_clip_shows_its_object_colour_and_motion():
    # A red object moving right: the red pixels' mean x increases from the first to the last frame.
    a = data.sample_attributes(0)
    a.update(shape="square", colour="red", size="large", motion="right", speed="quickly", second=None, lane=0,
             background="black", texture="plain")
    v = data.render([a])[0]
    red = (v[:, 0] > 0.8) & (v[:, 1] < 0.3)
    xs = torch.arange(data.WIDTH).float()
    mean_x = [(red[t].float().sum(0) * xs).sum() / red[t].sum() for t in (0, data.NUM_FRAMES - 1)]
    assert red[0].sum() > 20 and mean_x[1] - mean_x[0] > 10
