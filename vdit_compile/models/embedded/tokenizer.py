"""Word-level tokenizer over the caption vocabulary of the procedural data.

Why: no tokenizer can be downloaded, and the captions come from a closed grammar, so a word-level vocabulary
is exact and tiny. Unknown words are a design decision: by default (``unknown="error"``) they raise a
ValueError naming the words and the vocabulary, because a prompt the model never saw a word of would be
silently misread otherwise. With ``unknown="unk"`` they map to ``<unk>``; the reference training replaces a
few words by ``<unk>`` so the model learns to ignore it rather than produce garbage.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .data import VOCAB

PAD, UNK = "<pad>", "<unk>"
MAX_LENGTH = 24  # the longest caption of the grammar has 21 words


class CaptionTokenizer:
    """Maps captions to fixed-length id tensors (B, max_length) plus a bool mask of real tokens."""

    def __init__(self, vocab: Sequence[str] = VOCAB, max_length: int = MAX_LENGTH, unknown: str = "error"):
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        words = [w for w in vocab if w not in (PAD, UNK)]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.vocab = [PAD, UNK] + words
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)
        self.unknown = unknown
        self.pad_id, self.unk_id = 0, 1

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, caption: str) -> list[str]:
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a str, got {type(caption).__name__}")
        return caption.lower().replace(",", " ").replace(".", " ").split()

    def encode(self, caption: str, unknown: str | None = None) -> list[int]:
        mode = unknown or self.unknown
        words = self.words(caption)
        missing = [w for w in words if w not in self.index]
        if missing and mode == "error":
            raise ValueError(
                f"unknown word(s) {missing} in prompt {caption!r}; the embedded model knows only its caption "
                f"vocabulary ({len(self.vocab) - 2} words: {' '.join(self.vocab[2:])}). "
                "Pass unknown='unk' to map them to <unk> instead.")
        if len(words) > self.max_length:
            raise ValueError(f"prompt has {len(words)} words, the tokenizer takes at most {self.max_length}")
        return [self.index.get(w, self.unk_id) for w in words]

    def __call__(self, captions: str | Sequence[str], device=None, unknown: str | None = None):
        """Returns (input_ids (B, L) int64, attention_mask (B, L) bool); the empty caption is all padding."""
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        for i, c in enumerate(captions):
            row = self.encode(c, unknown)
            if row:
                ids[i, : len(row)] = torch.tensor(row)
        if device is not None and torch.device(device).type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)  # no host wait on queued GPU work
        elif device is not None:
            ids = ids.to(device)
        return ids, ids != self.pad_id

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != self.pad_id)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab[2:], "max_length": self.max_length, "unknown": self.unknown}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionTokenizer":
        return cls(d["vocab"], d["max_length"], d.get("unknown", "error"))
