"""The kinds of attention site detection tells apart (shared vocabulary, like :mod:`.layout`).

A ``str`` enum so that a kind is still the plain string the plan JSON stores and older code compares
against (``site.kind == "video_self"``), while new code names the members and a typo is an
``AttributeError`` instead of a silently false comparison.
"""
from __future__ import annotations

from enum import Enum


class SiteKind(str, Enum):
    """What an attention site attends over (see :mod:`vdit_compile.passes.detect` for each rule)."""

    VIDEO_SELF = "video_self"  # exactly the T'*H'*W' video tokens
    JOINT_TEXT_PREFIX = "joint_text_prefix"  # text tokens, then the video (CogVideoX)
    JOINT_TEXT_SUFFIX = "joint_text_suffix"  # the video, then text tokens (HunyuanVideo)
    CROSS = "cross"  # video queries on other (text) keys
    SPATIAL = "spatial"  # one frame's tokens per batch row (factorised)
    TEMPORAL = "temporal"  # T' tokens per pixel (factorised)
    OTHER = "other"  # anything else, or 3D attention whose layout could not be established

    def __str__(self) -> str:  # the value, as the plain string it replaces (Python 3.12 changed the default)
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def tileable(self) -> bool:
        """Attention over the whole video (and maybe text): what the tile op can serve."""
        return self in TILEABLE_KINDS


#: the kinds the tile op serves (given a known layout); the plan format reads and writes them as strings
TILEABLE_KINDS = (SiteKind.VIDEO_SELF, SiteKind.JOINT_TEXT_PREFIX, SiteKind.JOINT_TEXT_SUFFIX)
