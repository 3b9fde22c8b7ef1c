"""Token layout of one attention site: ``[text prefix] + T frames x (H*W) tokens + [text suffix]``.

Every other part of vdit-compile (masks, the op, the Triton kernel, calibration, export,
sequence parallelism) speaks in terms of this object, so it is deliberately tiny and
serialisable.  Video tokens must be frame-major (all tokens of frame 0, then frame 1, ...);
a site whose tokens are not frame-major cannot be tiled and is left dense by the passes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    num_frames: int
    height: int
    width: int
    text_prefix: int = 0
    text_suffix: int = 0
    order: str = "THW"

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TokenLayout.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("text_prefix", "text_suffix"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TokenLayout.{name} must be >= 0, found {getattr(self, name)}")
        if self.order not in ("THW", "TWH"):
            raise ValueError(f"TokenLayout.order must be frame-major 'THW' or 'TWH', found {self.order!r}")

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame (P)."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.num_frames * self.frame_tokens

    @property
    def seq_len(self) -> int:
        return self.text_prefix + self.video_tokens + self.text_suffix

    def with_frames(self, num_frames: int) -> "TokenLayout":
        return TokenLayout(num_frames, self.height, self.width, self.text_prefix, self.text_suffix, self.order)

    def frame_ids(self, device=None) -> torch.Tensor:
        """Frame index of every token (``-1`` for text tokens), shape ``(L,)``."""
        ids = torch.full((self.seq_len,), -1, dtype=torch.long, device=device)
        vid = torch.arange(self.num_frames, device=device).repeat_interleave(self.frame_tokens)
        ids[self.text_prefix : self.text_prefix + self.video_tokens] = vid
        return ids

    def check_seq_len(self, seq_len: int, what: str = "sequence") -> None:
        if seq_len != self.seq_len:
            raise ValueError(
                f"{what} length {seq_len} does not match the layout {self.describe()} "
                f"(expected {self.seq_len} tokens)"
            )

    def describe(self) -> str:
        parts = []
        if self.text_prefix:
            parts.append(f"text[{self.text_prefix}]+")
        parts.append(f"{self.num_frames}x{self.height}x{self.width}({self.order})")
        if self.text_suffix:
            parts.append(f"+text[{self.text_suffix}]")
        return "".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(**d)
