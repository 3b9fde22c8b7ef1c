"""The dense teacher's reference clips, optionally cached on disk.

Sampling the 50-step teacher is the most expensive part of a scorecard on a CPU, and every variant
(plans, step counts, distilled stages) is compared against the same clips; the cache file stores the
clips with what they were made from and is only reused when all of it matches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .prompts import PromptSet
from .sampling import sample


def reference_clips(
    teacher: Callable[[], object],
    prompts: PromptSet,
    steps: int,
    guidance: Optional[float] = None,
    batch_size: int = 1,
    cache: Optional[Path] = None,
    key: str = "",
    progress: bool = True,
) -> torch.Tensor:
    """Clips of ``teacher()`` (a loader, so nothing is built when the cache hits) with ``steps`` steps."""
    meta = {"key": key, "prompts": list(prompts.prompts), "seeds": list(prompts.seeds), "steps": int(steps),
            "guidance": guidance}
    if cache is not None and Path(cache).is_file():
        saved = torch.load(str(cache), map_location="cpu", weights_only=True)
        if saved.get("meta") == meta:
            return saved["clips"]
        print(f"reference cache {cache} was made with other settings; sampling the reference again")
    clips = sample(teacher(), prompts.prompts, prompts.seeds, steps, guidance, batch_size, progress,
                   desc=f"dense reference ({steps} steps)").clips
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"meta": meta, "clips": clips}, str(cache))
    return clips
