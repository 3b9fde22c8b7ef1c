"""Prompt-adherence classifier: recognises the attributes (shape, colour, motion) of a clip.

Trained on the embedded model's procedural data (``tools/train_classifier.py``) and shipped in
``vdit_compile/eval/weights/`` (fp16 safetensors + JSON config, about 1 MB), so the scorecard can say
whether a generated clip shows what its prompt asked for.  Its accuracy on real procedural clips is
the ceiling a generator can reach (docs/eval/SCORECARD.md).

Architecture (why; sized for training on a 2-core CPU in minutes): a per-frame 2D CNN (stride-2 stem,
two more conv stages, 4x4 grid of features per frame) that never mixes frames, so it doubles as the
per-frame encoder of the temporal-consistency metric; then two temporal 1D convs over the frame
features (flattened 4x4 grid, so where the object is stays visible) for motion.  Shape and colour
heads read the per-frame features pooled over time and space (mean + max); the motion head reads the
temporal features over the whole clip, because "bounce" or "grow" are only visible in how features
evolve.  Inputs are resampled to a fixed ``frames x size x size`` so clips of other sizes still score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measures import MEASURES, check_measured

#: Directory of the shipped weights (``classifier.safetensors`` + ``classifier.json``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "classifier"


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _tconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """One classification head per attribute; ``attributes`` maps name -> ordered class labels."""

    def __init__(self, attributes: Mapping[str, Sequence[str]], frames: int = 16, size: int = 32, width: int = 32,
                 temporal_heads: Sequence[str] = ("motion",), measured: Optional[Mapping[str, str]] = None):
        super().__init__()
        if not attributes:
            raise ValueError("AttributeClassifier needs at least one attribute with its class labels")
        # attributes predicted by a measure from the pixels (eval/measures.py) instead of their learned head
        self.measured = dict(measured or {})
        check_measured(self.measured, {k: list(v) for k, v in attributes.items()})
        if frames < 4 or frames % 2:
            raise ValueError(f"frames must be an even number >= 4, found {frames}")
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.frames, self.size, self.width = frames, size, width
        # Heads that read the temporal features (which keep the 4x4 grid, so *where* is visible) instead of the
        # pooled ones: motion always; every attribute in worlds where the labelled object is told apart from the
        # other one by its place (textured: upper lane, half of the clips have two objects).
        self.temporal_heads = list(temporal_heads)
        w = width
        self.frame = nn.Sequential(
            _conv(3, w, stride=2), _conv(w, 2 * w), nn.MaxPool2d(2), _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4)
        )
        c, hidden = 4 * w, 128
        self.temporal = nn.Sequential(_tconv(c * 16, hidden), _tconv(hidden, hidden))
        self.heads = nn.ModuleDict()
        for name, labels in self.attributes.items():
            if name in self.temporal_heads:
                self.heads[name] = nn.Sequential(nn.Flatten(), nn.Linear(hidden * frames, hidden), nn.ReLU(), nn.Linear(hidden, len(labels)))
            else:
                self.heads[name] = nn.Linear(2 * c, len(labels))

    def config(self) -> dict:
        cfg = {"attributes": self.attributes, "frames": self.frames, "size": self.size, "width": self.width}
        if self.temporal_heads != ["motion"]:
            cfg["temporal_heads"] = self.temporal_heads
        if self.measured:
            cfg["measured"] = dict(self.measured)
        return cfg

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` or ``(T, 3, H, W)`` in [0, 1] -> ``(B, frames, 3, size, size)`` in [-1, 1]."""
        if video.dim() == 4:
            video = video.unsqueeze(0)
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"classifier input must be (B,T,3,H,W) or (T,3,H,W) in [0,1], found {tuple(video.shape)}")
        x = video.float()
        if tuple(x.shape[1:]) != (self.frames, 3, self.size, self.size):
            x = x.permute(0, 2, 1, 3, 4)
            x = F.interpolate(x, size=(self.frames, self.size, self.size), mode="trilinear", align_corners=False)
            x = x.permute(0, 2, 1, 3, 4)
        return x * 2 - 1

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, size, size)`` in [-1, 1] -> ``(N, 4w, 4, 4)`` per-frame feature maps."""
        return self.frame(x)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(video)
        B, T = x.shape[:2]
        f = self._frames(x.flatten(0, 1)).reshape(B, T, -1, 4, 4)
        pooled = torch.cat([f.mean(dim=(1, 3, 4)), f.amax(dim=(1, 3, 4))], dim=1)
        h = self.temporal(f.flatten(2).transpose(1, 2))
        return {n: head(h if n in self.temporal_heads else pooled) for n, head in self.heads.items()}

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame features ``(T, 3, H, W) -> (T, D)`` from the per-frame encoder (no temporal mixing)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frame_features expects (T,3,H,W) in [0,1], found {tuple(frames.shape)}")
        x = frames.float().to(next(self.parameters()).device)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self._frames(x * 2 - 1).flatten(1)

    @torch.no_grad()
    def predict(self, videos: torch.Tensor, batch_size: int = 32) -> dict[str, list[str]]:
        """Predicted label per attribute for each clip of ``videos`` (B, T, 3, H, W)."""
        if videos.dim() == 4:
            videos = videos.unsqueeze(0)
        out: dict[str, list[str]] = {n: [] for n in self.attributes}
        for i in range(0, videos.shape[0], batch_size):
            chunk = videos[i : i + batch_size]
            logits = self(chunk)
            for n, lg in logits.items():
                if n in self.measured:
                    out[n].extend(MEASURES[self.measured[n]](chunk))
                else:
                    out[n].extend(self.attributes[n][j] for j in lg.argmax(1).tolist())
        return out

    def save(self, directory: Path | str = WEIGHTS_DIR, name: str = WEIGHTS_NAME, extra: Optional[dict] = None) -> Path:
        """Write ``name.safetensors`` (fp16) and ``name.json`` (config + ``extra``, e.g. accuracies)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(d / f"{name}.safetensors"))
        (d / f"{name}.json").write_text(json.dumps({**self.config(), **(extra or {})}, indent=2) + "\n")
        return d / f"{name}.safetensors"


def classifier_dir(world: str = "embedded") -> Path:
    """Where a world's shipped classifier lives: this package's weights/ for the embedded world, the world's own
    weights/ otherwise (it is trained together with the world's model)."""
    if world == "embedded":
        return WEIGHTS_DIR
    from ..models.worlds import world_package

    return Path(world_package(world).WEIGHTS_DIR)


def load_classifier(directory: Path | str | None = None, name: str = WEIGHTS_NAME, device="cpu",
                    world: str = "embedded") -> AttributeClassifier:
    """Load the shipped (or a given) classifier in eval mode; clear error if weights are missing."""
    from safetensors.torch import load_file

    d = Path(directory) if directory is not None else classifier_dir(world)
    cfg_path, w_path = d / f"{name}.json", d / f"{name}.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(
            f"classifier weights not found: expected {w_path} and {cfg_path}; "
            f"train them with `python tools/train_classifier.py{'' if world == 'embedded' else ' --world ' + world}`"
        )
    cfg = json.loads(cfg_path.read_text())
    model = AttributeClassifier(cfg["attributes"], cfg["frames"], cfg["size"], cfg["width"],
                                cfg.get("temporal_heads", ("motion",)), cfg.get("measured"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(w_path)).items()}
    model.load_state_dict(state)
    model.meta = cfg  # accuracies and training provenance recorded at train time
    return model.to(device).eval()
