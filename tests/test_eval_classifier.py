"""The shipped prompt-adherence classifier recognises real held-out procedural clips."""
import pytest
import torch

from vdit_compile.eval import ATTRIBUTES, load_classifier, prompt_set
from vdit_compile.eval.classifier import AttributeClassifier


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_shipped_weights_small_and_described(classifier):
    from vdit_compile.eval.classifier import WEIGHTS_DIR

    assert (WEIGHTS_DIR / "classifier.safetensors").stat().st_size < 2_000_000
    assert classifier.attributes == {k: list(v) for k, v in ATTRIBUTES.items()}
    ceiling = classifier.meta["heldout_accuracy"]["all"]
    assert all(0.9 <= ceiling[a] <= 1.0 for a in ATTRIBUTES)


def test_real_clips_scored_far_above_chance(classifier):
    ps = prompt_set(48, offset=2000)  # not the clips the ceiling was measured on
    pred = classifier.predict(ps.real_clips())
    for attr, labels in ATTRIBUTES.items():
        acc = sum(p == t for p, t in zip(pred[attr], ps.labels[attr])) / len(ps)
        assert acc > max(0.75, 3.0 / len(labels)), (attr, acc)


def test_frame_features_do_not_mix_frames(classifier):
    clip = prompt_set(1, offset=3000).real_clips()[0]
    f = classifier.frame_features(clip)
    assert f.shape == (clip.shape[0], 1024)
    shuffled = classifier.frame_features(clip.flip(0))
    torch.testing.assert_close(shuffled, f.flip(0))
    with pytest.raises(ValueError, match=r"\(T,3,H,W\)"):
        classifier.frame_features(clip[None])


def test_resamples_other_sizes_and_rejects_bad_input():
    m = AttributeClassifier({"shape": ["a", "b"], "motion": ["x", "y", "z"]}, frames=8, size=16, width=4).eval()
    out = m(torch.rand(2, 12, 3, 24, 20))
    assert out["shape"].shape == (2, 2) and out["motion"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(B,T,3,H,W\)"):
        m(torch.rand(2, 12, 24, 20))
    with pytest.raises(ValueError, match="at least one attribute"):
        AttributeClassifier({})


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        load_classifier(tmp_path)
