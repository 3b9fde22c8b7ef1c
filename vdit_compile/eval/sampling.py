"""Run a pipeline over a prompt set with fixed seeds and time it.

Why separate: the scorecard, the demo and the distillation report all need "the clips of this sampler
on these prompts and seeds" and a fair wall time per video, and every sampler compared must start from
the same noise.  Each prompt ``i`` gets a CPU ``torch.Generator`` seeded with ``seeds[i]`` (CPU so the
noise is the same on every device); pipelines draw per-sample noise from per-sample generators, so
the clips do not depend on the batch size.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Samples:
    """Clips ``(N, T, 3, H, W)`` float32 on CPU in [0, 1], and the seconds each batch took."""

    clips: torch.Tensor
    batch_seconds: list[float]
    batch_sizes: list[int]

    @property
    def seconds_per_video(self) -> float:
        """Mean wall time per video, leaving out the first batch (warm-up, compilation) when there are more."""
        secs, sizes = self.batch_seconds, self.batch_sizes
        if len(secs) > 1:
            secs, sizes = secs[1:], sizes[1:]
        return sum(secs) / sum(sizes)

    @property
    def first_batch_seconds(self) -> float:
        return self.batch_seconds[0]


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def frames_tensor(frames) -> torch.Tensor:
    """Pipeline output ``.frames`` -> float32 CPU ``(B, T, 3, H, W)`` in [0, 1] (tensor or numpy, channels first or last)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        raise TypeError(
            "the pipeline's output .frames must be a (B, T, 3, H, W) or (B, T, H, W, 3) tensor/array in [0, 1], "
            f"found {type(frames).__name__}{'' if not hasattr(frames, 'shape') else tuple(frames.shape)}"
        )
    if frames.shape[2] != 3 and frames.shape[-1] == 3:
        frames = frames.permute(0, 1, 4, 2, 3)
    if frames.shape[2] != 3:
        raise ValueError(f"expected 3 colour channels in the pipeline's frames, found shape {tuple(frames.shape)}")
    return frames.detach().float().cpu()


def _sync(pipe) -> None:
    if torch.cuda.is_available():
        dev = getattr(pipe, "device", None)
        if dev is not None and torch.device(dev).type == "cuda":
            torch.cuda.synchronize()


def sample(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: Optional[float] = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "sampling",
) -> Samples:
    """Generate one clip per (prompt, seed) with ``steps`` sampling steps; returns clips and batch timings."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, found {len(prompts)} prompts and {len(seeds)} seeds")
    if not prompts:
        raise ValueError("need at least one prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, found steps={steps}, batch_size={batch_size}")
    kwargs = {"num_inference_steps": int(steps)}
    if guidance is not None:
        kwargs["guidance_scale"] = float(guidance)
    if _accepts(pipe.__call__, "progress"):
        kwargs["progress"] = False
    elif hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    clips, secs, sizes = [], [], []
    bar = tqdm(total=len(prompts), desc=desc, unit="video", disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i : i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        _sync(pipe)
        t0 = time.perf_counter()
        out = pipe(p, generator=gens, **kwargs)
        _sync(pipe)
        secs.append(time.perf_counter() - t0)
        sizes.append(len(p))
        clips.append(frames_tensor(out.frames if hasattr(out, "frames") else out[0]))
        bar.update(len(p))
    bar.close()
    return Samples(torch.cat(clips), secs, sizes)
