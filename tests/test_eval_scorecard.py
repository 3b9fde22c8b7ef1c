"""Scorecard on real procedural clips: a 'pipeline' that replays the real clip of each prompt."""
import math

import pytest
import torch

from vdit_compile.eval import load_classifier, prompt_set, render_table, sample, score_clips, scorecard, to_json
from vdit_compile.eval.prompts import HELDOUT_SEED_BASE, is_heldout
from vdit_compile.models.embedded import data


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


class ReplayPipeline:
    """Returns the real procedural clip its caption describes (jitter from the seed), plus optional noise."""

    transformer = None

    def __init__(self, noise: float = 0.0):
        self.noise = noise
        self.calls = []

    def __call__(self, prompt, num_inference_steps=50, generator=None, guidance_scale=None, progress=True):
        self.calls.append((list(prompt), num_inference_steps))
        clips = []
        for p, g in zip(prompt, generator):
            attrs = {**data.sample_attributes(0), **data.parse_caption(p)}
            attrs["lane"] = -1 if attrs["second"] else 0
            if attrs["second"]:
                attrs["second"] = {**attrs["second"], "jitter_x": 0.0, "jitter_y": 0.0, "angle0": 0.0, "lane": 1}
            clip = data.render([attrs])[0]
            if self.noise:
                clip = (clip + self.noise * torch.randn(clip.shape, generator=g)).clamp(0, 1)
            clips.append(clip)
        return type("Out", (), {"frames": torch.stack(clips)})()


def test_prompt_set_labels_match_captions():
    ps = prompt_set(6, offset=3)
    assert ps.seeds == list(range(3, 9))
    for p, a in zip(ps.prompts, ps.attributes):
        parsed = data.parse_caption(p)
        assert all(parsed[n] == a[n] for n in ("shape", "colour", "motion"))
        assert is_heldout(a["seed"]) and a["seed"] >= HELDOUT_SEED_BASE
    assert ps.labels["shape"] == [a["shape"] for a in ps.attributes]


def test_reference_vs_itself_and_noise(classifier):
    ps = prompt_set(4)
    real = ps.real_clips()
    card = score_clips(real, ps, reference=real, classifier=classifier)
    assert card["psnr"] == math.inf and card["ssim"] == pytest.approx(1.0)
    assert card["accuracy"] == card["real_accuracy"]
    assert card["temporal_consistency"] == pytest.approx(card["real_temporal_consistency"])
    noisy = (real + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    card2 = score_clips(noisy, ps, reference=real, classifier=classifier, real=False)
    assert 20 < card2["psnr"] < 35 and card2["ssim"] < 0.99
    assert card2["flicker"] > card["flicker"]
    assert "| real clips" in render_table([card, card2])
    assert '"psnr": "inf"' in to_json(card)


def test_scorecard_generates_with_seeds_and_times(classifier):
    pipe = ReplayPipeline(noise=0.02)
    card, clips, ref = scorecard(pipe, prompts=3, steps=7, reference=ReplayPipeline(), reference_steps=5,
                                 classifier=classifier, batch_size=2, return_clips=True, progress=False, name="replay")
    assert clips.shape == (3, data.NUM_FRAMES, 3, data.HEIGHT, data.WIDTH) and ref.shape == clips.shape
    assert [c[1] for c in pipe.calls] == [7, 7] and [len(c[0]) for c in pipe.calls] == [2, 1]
    assert 25 < card["psnr"] < 45 and 0.5 < card["ssim"] < 1.0
    assert card["seconds_per_video"] > 0 and card["settings"]["steps"] == 7
    assert set(card["accuracy"]) == {"shape", "colour", "motion"}
    # seeding: the same prompt/seed gives the same noise whatever the batch size
    again = sample(ReplayPipeline(noise=0.02), prompt_set(3).prompts, [0, 1, 2], 7, batch_size=1, progress=False)
    assert torch.equal(again.clips, clips)


def test_bad_inputs(classifier):
    ps = prompt_set(2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(ReplayPipeline(), ps.prompts, [0], 3, progress=False)
    with pytest.raises(ValueError, match="match the generated clips"):
        score_clips(ps.real_clips(), ps, reference=ps.real_clips()[:, :8], classifier=classifier)
