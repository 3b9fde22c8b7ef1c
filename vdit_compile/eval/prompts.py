"""Scorecard prompts with known labels, built from the embedded model's procedural data.

Each prompt is the caption of a held-out procedural clip (``data.sample_clip(seed)``), so the
attributes it asks for are known exactly and a classifier's prediction on the generated clip can be
checked.  The labelled object is the *primary* one: the first phrase of the caption (``caption_of``
writes the top-level attributes first), which is the upper-lane object in two-object scenes.
Held-out seeds start at :data:`HELDOUT_SEED_BASE`; the classifier never trains on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models.embedded import data
from ..models.worlds import DEFAULT_WORLD, scored_attributes, world_data

#: Attributes the classifier recognises and the scorecard reports (class labels in data order).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(data.SHAPES),
    "colour": tuple(data.COLOUR_NAMES),
    "motion": tuple(data.MOTIONS),
}
#: First held-out seed; the range [base, base + HELDOUT_SPAN) is reserved for evaluation.
HELDOUT_SEED_BASE = 7_000_000_000
HELDOUT_SPAN = 1_000_000


def is_heldout(seed: int) -> bool:
    return HELDOUT_SEED_BASE <= seed < HELDOUT_SEED_BASE + HELDOUT_SPAN


def heldout_seeds(n: int, offset: int = 0) -> list[int]:
    """The first ``n`` evaluation seeds (after ``offset``)."""
    if n < 1 or offset < 0 or offset + n > HELDOUT_SPAN:
        raise ValueError(f"need 1 <= n and 0 <= offset with offset + n <= {HELDOUT_SPAN}, found n={n}, offset={offset}")
    return list(range(HELDOUT_SEED_BASE + offset, HELDOUT_SEED_BASE + offset + n))


def labels_of(attrs: list[dict], world: str = DEFAULT_WORLD) -> dict[str, list[str]]:
    """Per attribute, the primary object's label of every clip."""
    return {name: [a[name] for a in attrs] for name in scored_attributes(world)}


@dataclass
class PromptSet:
    """Prompts, the sampling seed of each, their labels, and the real clips they were captioned from."""

    prompts: list[str]
    seeds: list[int]
    labels: dict[str, list[str]] = field(default_factory=dict)
    attributes: list[dict] = field(default_factory=list)
    world: str = DEFAULT_WORLD

    def __len__(self) -> int:
        return len(self.prompts)

    def real_clips(self, device="cpu"):
        """The procedural clips the prompts were captioned from (B, T, 3, H, W)."""
        return world_data(self.world).render(self.attributes, device)


def prompt_set(n: int, offset: int = 0, world: str = DEFAULT_WORLD) -> PromptSet:
    """``n`` held-out prompts; prompt ``i`` is sampled with seed ``i + offset`` (the same seed for every sampler
    compared, so teacher and optimised clips start from the same noise)."""
    seeds = heldout_seeds(n, offset)
    d = world_data(world)
    attrs = [d.sample_attributes(s) for s in seeds]
    return PromptSet(
        prompts=[d.caption_of(a) for a in attrs],
        seeds=[offset + i for i in range(n)],
        labels=labels_of(attrs, world),
        attributes=attrs,
        world=world,
    )
