"""eval/measures.py: the textured world's pan measured from the pixels, and classifiers that use a measure."""
import pytest
import torch

from vdit_compile.eval.classifier import AttributeClassifier, load_classifier
from vdit_compile.eval.measures import DRIFTS, background_drift


def _drifting(label: str, g: torch.Generator, T: int = 8, size: int = 32) -> torch.Tensor:
    """A dark noise background moving by the label's shift per frame, with a bright square crossing it."""
    dx, dy = DRIFTS[label]
    field = torch.rand(3, size + 2 * T, size + 2 * T, generator=g) * 0.25  # dark: every channel < 0.25
    frames = []
    for t in range(T):
        x0, y0 = T - dx * t, T - dy * t  # content moving +dx shows field x - dx*t at pixel x
        f = field[:, y0:y0 + size, x0:x0 + size].clone()
        f[:, 10:18, 4 + 2 * t:12 + 2 * t] = 0.9  # a bright object moving right 2 px per frame: ignored
        frames.append(f)
    return torch.stack(frames)


def test_background_drift_finds_every_shift_and_ignores_bright_objects():
    g = torch.Generator().manual_seed(0)
    labels = list(DRIFTS) * 3
    clips = torch.stack([_drifting(lab, g) for lab in labels])
    assert background_drift(clips) == labels


def test_background_drift_on_real_textured_clips():
    from vdit_compile.models.textured import data

    videos, _, attrs = data.sample_batch(seeds=list(range(7000, 7040)))
    pred = background_drift(videos)
    acc = sum(p == a["pan"] for p, a in zip(pred, attrs)) / len(attrs)
    assert acc >= 0.95, acc  # 1,024 held-out clips: see docs/textured/MODEL_CARD.md


def test_background_drift_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        background_drift(torch.rand(4, 3, 16, 16))
    with pytest.raises(ValueError, match="larger than"):
        background_drift(torch.rand(1, 4, 3, 4, 4))


def test_classifier_with_a_measured_attribute_predicts_it_and_round_trips(tmp_path):
    attrs = {"shape": ["a", "b"], "pan": list(DRIFTS)}
    torch.manual_seed(0)
    clf = AttributeClassifier(attrs, frames=8, size=16, width=4, measured={"pan": "background_drift"}).eval()
    g = torch.Generator().manual_seed(1)
    labels = ["left", "down", "still", "up", "right"]
    clips = torch.stack([_drifting(lab, g) for lab in labels])
    pred = clf.predict(clips)
    assert pred["pan"] == labels and len(pred["shape"]) == len(labels)
    clf.save(tmp_path)
    back = load_classifier(tmp_path)
    assert back.measured == {"pan": "background_drift"} and back.predict(clips)["pan"] == labels
    plain = AttributeClassifier(attrs, frames=8, size=16, width=4).eval()
    plain.load_state_dict(clf.state_dict())
    assert plain.predict(clips)["shape"] == pred["shape"]  # the learned heads are untouched


def test_measured_config_errors_name_what_is_known():
    attrs = {"pan": list(DRIFTS), "shape": ["a", "b"]}
    with pytest.raises(ValueError, match="known measures"):
        AttributeClassifier(attrs, measured={"pan": "optical_flow"})
    with pytest.raises(ValueError, match="not one of the classifier's attributes"):
        AttributeClassifier(attrs, measured={"texture": "background_drift"})
    with pytest.raises(ValueError, match="lacks"):
        AttributeClassifier(attrs, measured={"shape": "background_drift"})
