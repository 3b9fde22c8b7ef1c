"""Token layout of one attention site: ``[text prefix] + T frames x (H*W) tokens + [text suffix]``.

Every other part of vdit-compile (masks, the op, the Triton kernel, calibration, export,
sequence parallelism) speaks in terms of this object, so it is deliberately tiny and
serialisable.  Video tokens are frame-major (``THW``/``TWH``: all tokens of frame 0, then frame 1,
...) or frame-minor (``HWT``: the frame index runs fastest); the op reorders frame-minor tokens into
frame-major tiles around the kernels, so both are tileable.

Some models trim padded text by value (Mochi, HunyuanVideo 1.5, Framepack), so the number of
text tokens changes from call to call while the video grid does not.  Their sites carry a
*symbolic* layout: ``dynamic_text`` names the side (``"prefix"`` or ``"suffix"``) whose length
is only known per call, and that side's count is stored as 0.  Plans keep the symbolic layout
(a plan must not depend on a prompt's length); :meth:`TokenLayout.resolve` gives the concrete
layout of one call from its sequence length.
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
    dynamic_text: str = ""  # "" | "prefix" | "suffix": that side's text length is known per call only

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TokenLayout.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("text_prefix", "text_suffix"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TokenLayout.{name} must be >= 0, found {getattr(self, name)}")
        if self.order not in ("THW", "TWH", "HWT"):
            raise ValueError(f"TokenLayout.order must be frame-major 'THW' / 'TWH' or frame-minor 'HWT', "
                             f"found {self.order!r}")
        if self.dynamic_text not in ("", "prefix", "suffix"):
            raise ValueError(f"TokenLayout.dynamic_text must be '', 'prefix' or 'suffix', found {self.dynamic_text!r}")
        if self.dynamic_text and getattr(self, "text_" + self.dynamic_text) != 0:
            raise ValueError(f"TokenLayout: the dynamic text {self.dynamic_text} is stored as 0 tokens, found "
                             f"{getattr(self, 'text_' + self.dynamic_text)}")

    @property
    def is_dynamic(self) -> bool:
        """True when one side's text length is only known per call (see :meth:`resolve`)."""
        return bool(self.dynamic_text)

    @property
    def static_tokens(self) -> int:
        """Tokens that do not depend on the call: video plus the fixed text side(s)."""
        return self.text_prefix + self.video_tokens + self.text_suffix

    def resolve(self, seq_len: int) -> "TokenLayout":
        """The concrete layout of a call with ``seq_len`` tokens (``self`` when not dynamic)."""
        if not self.dynamic_text:
            self.check_seq_len(seq_len)
            return self
        n = int(seq_len) - self.static_tokens
        if n < 0:
            raise ValueError(f"sequence length {seq_len} is shorter than the {self.static_tokens} fixed tokens of "
                             f"the layout {self.describe()}")
        pre, suf = (self.text_prefix + n, self.text_suffix) if self.dynamic_text == "prefix" else (self.text_prefix, self.text_suffix + n)
        return TokenLayout(self.num_frames, self.height, self.width, pre, suf, self.order)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame (P)."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.num_frames * self.frame_tokens

    @property
    def seq_len(self) -> int:
        """Sequence length; for a dynamic layout only its fixed tokens (densities are then over those)."""
        return self.static_tokens

    def _concrete(self, what: str) -> None:
        if self.dynamic_text:
            raise ValueError(f"{what}: layout {self.describe()} has a per-call text length; resolve(seq_len) it first")

    def with_frames(self, num_frames: int) -> "TokenLayout":
        return TokenLayout(num_frames, self.height, self.width, self.text_prefix, self.text_suffix, self.order,
                           self.dynamic_text)

    def frame_ids(self, device=None) -> torch.Tensor:
        """Frame index of every token (``-1`` for text tokens), shape ``(L,)``."""
        self._concrete("frame_ids")
        ids = torch.full((self.seq_len,), -1, dtype=torch.long, device=device)
        if self.order == "HWT":  # frame-minor: the frame index runs fastest
            vid = torch.arange(self.num_frames, device=device).repeat(self.frame_tokens)
        else:
            vid = torch.arange(self.num_frames, device=device).repeat_interleave(self.frame_tokens)
        ids[self.text_prefix : self.text_prefix + self.video_tokens] = vid
        return ids

    def check_seq_len(self, seq_len: int, what: str = "sequence") -> None:
        self._concrete("check_seq_len")
        if seq_len != self.seq_len:
            raise ValueError(
                f"{what} length {seq_len} does not match the layout {self.describe()} "
                f"(expected {self.seq_len} tokens)"
            )

    def describe(self) -> str:
        parts = []
        dyn = self.dynamic_text  # its side is shown as text[*]: the length is known per call
        if self.text_prefix or dyn == "prefix":
            parts.append(f"text[{'*' if dyn == 'prefix' else self.text_prefix}]+")
        parts.append(f"{self.num_frames}x{self.height}x{self.width}({self.order})")
        if self.text_suffix or dyn == "suffix":
            parts.append(f"+text[{'*' if dyn == 'suffix' else self.text_suffix}]")
        return "".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["dynamic_text"]:  # plans of fixed-text models keep their format
            del d["dynamic_text"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(**d)
