"""Quality scorecard: metrics, the prompt-adherence classifier and :func:`scorecard`.

Used to price every optimisation (tile masks, few-step distillation) in measured quality::

    from vdit_compile.eval import scorecard, render_table
    teacher = scorecard(pipe, prompts=24, steps=50, name="dense 50", return_clips=True)
    card = scorecard(fast_pipe, prompts=24, steps=8, reference=teacher[1], name="fast 8")
    print(render_table([teacher[0], card]))

See docs/eval/SCORECARD.md for definitions and the shipped model's figures.
"""
from __future__ import annotations

from . import metrics
from .classifier import AttributeClassifier, load_classifier
from .prompts import ATTRIBUTES, PromptSet, prompt_set
from .sampling import Samples, sample
from .scorecard import render_table, resolve_prompts, score_clips, scorecard, to_json

__all__ = [
    "metrics", "AttributeClassifier", "load_classifier", "ATTRIBUTES", "PromptSet", "prompt_set", "Samples", "sample",
    "scorecard", "score_clips", "render_table", "resolve_prompts", "to_json",
]
