"""The quality scorecard: what a sampler's clips are worth, against labels and against the teacher.

``scorecard(pipe, prompts=24, steps=50, reference=teacher_clips)`` generates one clip per held-out
prompt and seed and reports:

* **accuracy** per attribute (shape, colour, motion) of the shipped classifier on the generated clips,
  against the labels the prompts were built from; next to it the classifier's accuracy on the *real*
  clips of the same prompts (``real_accuracy``) and on 1024 held-out real clips (``ceiling``, from
  the weights' metadata), and ``accuracy / ceiling``;
* **temporal consistency** and **flicker** (:mod:`vdit_compile.eval.metrics`), with the same numbers
  for the real clips as a yardstick;
* **PSNR / SSIM** per clip against ``reference`` (the dense many-step teacher on the same prompts and
  seeds), when given;
* **wall time per video** (first batch left out when there are several: warm-up / compilation).

The dict it returns is JSON-ready (:func:`to_json`) and :func:`render_table` prints several cards side
by side.  ``score_clips`` does the scoring alone, for callers that sampled already.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from statistics import mean
from typing import Optional, Sequence, Union

import torch

from ..models.worlds import DEFAULT_WORLD, scored_attributes, world_data, world_of_pipe
from . import metrics
from .classifier import AttributeClassifier, load_classifier
from .prompts import ATTRIBUTES, PromptSet, prompt_set
from .sampling import Samples, sample

PromptsArg = Union[int, PromptSet, Sequence[str]]


def resolve_prompts(prompts: PromptsArg, seeds: Optional[Sequence[int]] = None,
                    world: str = DEFAULT_WORLD) -> PromptSet:
    """An int -> that many held-out prompts; a PromptSet as is; strings -> parsed for labels when they are captions."""
    if isinstance(prompts, PromptSet):
        ps = prompts
    elif isinstance(prompts, int):
        ps = prompt_set(prompts, world=world)
    else:
        data = world_data(world)

        texts = list(prompts)
        if not texts or not all(isinstance(p, str) for p in texts):
            raise TypeError("prompts must be an int, a PromptSet or a non-empty list of strings")
        try:
            attrs = [data.parse_caption(p) for p in texts]
            labels = {n: [a[n] for a in attrs] for n in scored_attributes(world)}
        except ValueError:
            attrs, labels = [], {}  # free text: no labels, no accuracy
        ps = PromptSet(texts, list(range(len(texts))), labels, [], world)
    if seeds is not None:
        if len(seeds) != len(ps):
            raise ValueError(f"need one seed per prompt, found {len(ps)} prompts and {len(seeds)} seeds")
        ps = PromptSet(ps.prompts, [int(s) for s in seeds], ps.labels, ps.attributes, ps.world)
    return ps


def _finite_mean(values: list[float]) -> float:
    return math.inf if any(math.isinf(v) for v in values) else mean(values)


def _accuracy(classifier: AttributeClassifier, clips: torch.Tensor, labels: dict) -> tuple[dict, dict]:
    pred = classifier.predict(clips)
    acc = {n: mean(float(p == t) for p, t in zip(pred[n], labels[n])) for n in labels}
    return acc, pred


def score_clips(
    clips: torch.Tensor,
    prompts: PromptSet,
    reference: Optional[torch.Tensor] = None,
    classifier: Optional[AttributeClassifier] = None,
    real: bool = True,
) -> dict:
    """Score already generated clips ``(N, T, 3, H, W)`` for ``prompts`` (see module doc)."""
    if clips.dim() != 5 or clips.shape[0] != len(prompts):
        raise ValueError(f"clips must be (N, T, 3, H, W) with N = {len(prompts)} prompts, found {tuple(clips.shape)}")
    if reference is not None and tuple(reference.shape) != tuple(clips.shape):
        raise ValueError(
            f"reference clips must match the generated clips' shape {tuple(clips.shape)}, found {tuple(reference.shape)}"
        )
    clf = classifier or load_classifier(world=prompts.world)
    card: dict = {"clips": len(prompts)}
    per_clip = [{"prompt": p, "seed": s} for p, s in zip(prompts.prompts, prompts.seeds)]
    if prompts.labels:
        acc, pred = _accuracy(clf, clips, prompts.labels)
        card["accuracy"] = acc
        ceiling = getattr(clf, "meta", {}).get("heldout_accuracy", {}).get("all")
        if ceiling:
            card["ceiling"] = {n: ceiling[n] for n in acc}
            card["accuracy_vs_ceiling"] = {n: acc[n] / ceiling[n] for n in acc if ceiling[n] > 0}
        for i, row in enumerate(per_clip):
            row.update({f"pred_{n}": pred[n][i] for n in acc})
            row.update({f"label_{n}": prompts.labels[n][i] for n in acc})
    tc = metrics.temporal_consistency(clips, clf.frame_features)
    fl = metrics.flicker(clips)
    card["temporal_consistency"], card["flicker"] = mean(tc), mean(fl)
    for i, row in enumerate(per_clip):
        row.update(temporal_consistency=tc[i], flicker=fl[i])
    if real and prompts.attributes:
        real_clips = prompts.real_clips()
        if prompts.labels:
            card["real_accuracy"] = _accuracy(clf, real_clips, prompts.labels)[0]
        card["real_temporal_consistency"] = mean(metrics.temporal_consistency(real_clips, clf.frame_features))
        card["real_flicker"] = mean(metrics.flicker(real_clips))
    if reference is not None:
        reference = reference.float().cpu()
        ps, ss = metrics.psnr(clips, reference), metrics.ssim(clips, reference)
        card["psnr"], card["ssim"] = _finite_mean(ps), mean(ss)
        for i, row in enumerate(per_clip):
            row.update(psnr=ps[i], ssim=ss[i])
    card["per_clip"] = per_clip
    return card


def _device_name(pipe) -> str:
    dev = getattr(pipe, "device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        return torch.cuda.get_device_name(torch.device(dev))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def card_header(pipe, name: str, steps: int, guidance, prompts: int, batch_size: int, settings: Optional[dict] = None) -> dict:
    """The card's identity: sampler name, settings, device and date."""
    return {
        "name": name,
        "settings": {"steps": steps, "guidance": guidance, "prompts": prompts, "batch_size": batch_size, **(settings or {})},
        "device": _device_name(pipe),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def scorecard(
    pipe,
    prompts: PromptsArg = 24,
    seeds: Optional[Sequence[int]] = None,
    steps: int = 50,
    guidance: Optional[float] = None,
    reference: Union[None, torch.Tensor, object] = None,
    reference_steps: int = 50,
    reference_guidance: Optional[float] = None,
    classifier: Optional[AttributeClassifier] = None,
    batch_size: int = 1,
    name: Optional[str] = None,
    settings: Optional[dict] = None,
    progress: bool = True,
    return_clips: bool = False,
    world: Optional[str] = None,
):
    """Generate and score; see the module doc.  ``reference`` is teacher clips ``(N, T, 3, H, W)`` on the same
    prompts and seeds, or a pipeline (sampled here with ``reference_steps`` / ``reference_guidance``), or None.
    Returns the card (and the generated clips and the reference clips when ``return_clips``).
    ``world``: whose prompts, labels and classifier (default: the pipeline's world, see models.worlds)."""
    from ..validation import check_number

    check_number("steps", steps, minimum=1, integer=True)
    check_number("reference_steps", reference_steps, minimum=1, integer=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    ps = resolve_prompts(prompts, seeds, world or world_of_pipe(pipe))
    ref_clips = None
    if reference is not None and not isinstance(reference, torch.Tensor):
        ref_clips = sample(reference, ps.prompts, ps.seeds, reference_steps, reference_guidance, batch_size,
                           progress, desc=f"reference ({reference_steps} steps)").clips
    elif reference is not None:
        ref_clips = reference
    samples: Samples = sample(pipe, ps.prompts, ps.seeds, steps, guidance, batch_size, progress, desc=f"{name or 'sampler'} ({steps} steps)")
    card = card_header(pipe, name or type(pipe).__name__, steps, guidance, len(ps), batch_size, settings)
    card.update(score_clips(samples.clips, ps, ref_clips, classifier))
    card["seconds_per_video"] = samples.seconds_per_video
    card["first_batch_seconds"] = samples.first_batch_seconds
    return (card, samples.clips, ref_clips) if return_clips else card


# --------------------------------------------------------------------------------------------------- output
def _fmt(v, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


COLUMNS = (
    ("shape", lambda c: _fmt(c.get("accuracy", {}).get("shape"), True)),
    ("colour", lambda c: _fmt(c.get("accuracy", {}).get("colour"), True)),
    ("motion", lambda c: _fmt(c.get("accuracy", {}).get("motion"), True)),
    ("min acc/ceil", lambda c: _fmt(min(c["accuracy_vs_ceiling"].values()), True) if c.get("accuracy_vs_ceiling") else "-"),
    ("temp. cons.", lambda c: _fmt(c.get("temporal_consistency"))),
    ("flicker", lambda c: _fmt(c.get("flicker"), digits=2)),
    ("PSNR dB", lambda c: _fmt(c.get("psnr"), digits=2)),
    ("SSIM", lambda c: _fmt(c.get("ssim"))),
    ("s/video", lambda c: _fmt(c.get("seconds_per_video"), digits=2)),
)


def render_table(cards: Union[dict, Sequence[dict]], real: bool = True) -> str:
    """Markdown table, one row per card (plus a 'real clips' row from the first card's yardsticks)."""
    cards = [cards] if isinstance(cards, dict) else list(cards)
    # other worlds score more attributes (e.g. texture, pan): one column each, after motion
    extra = [n for c in cards for n in c.get("accuracy", {}) if n not in ATTRIBUTES]
    extra = list(dict.fromkeys(extra))
    columns = list(COLUMNS[:3]) + [(n, lambda c, n=n: _fmt(c.get("accuracy", {}).get(n), True)) for n in extra] \
        + list(COLUMNS[3:])
    names = list(ATTRIBUTES) + extra
    head = ["sampler", "steps"] + [c for c, _ in columns]
    rows = [[c.get("name", "?"), str(c.get("settings", {}).get("steps", "-"))] + [f(c) for _, f in columns] for c in cards]
    first = cards[0] if cards else {}
    if real and ("real_accuracy" in first or "real_temporal_consistency" in first):
        ra, ceil = first.get("real_accuracy", {}), first.get("ceiling", {})
        rows.append(
            ["real clips (same prompts)", "-"] + [_fmt(ra.get(n), True) for n in names]
            + [_fmt(min(ra[n] / ceil[n] for n in ra if ceil.get(n)), True) if ra and any(ceil.get(n) for n in ra) else "-",
               _fmt(first.get("real_temporal_consistency")), _fmt(first.get("real_flicker"), digits=2), "-", "-", "-"]
        )
        if ceil:
            rows.append(["classifier ceiling (1024 real)", "-"] + [_fmt(ceil.get(n), True) for n in names] + ["-"] * 6)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _jsonable(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_json(cards: Union[dict, Sequence[dict]], path: Optional[Union[str, Path]] = None) -> str:
    """Cards as strict JSON (``inf`` written as the string "inf"); written to ``path`` when given."""
    text = json.dumps(_jsonable(cards), indent=2) + "\n"
    if path is not None:
        from ..atomic import atomic_write_text

        atomic_write_text(path, text)
    return text
