"""Segments of the teacher's trajectory and the few-step sampler that walks them.

The teacher samples with flow-matching Euler over ``N`` steps: sigmas ``s_0 > s_1 > ... > s_N = 0``
and timesteps ``t_n`` (``s_n`` times the scheduler's ``num_train_timesteps``, after its shift), with
``x_{n+1} = x_n + (s_{n+1} - s_n) * v(x_n, t_n)`` where ``v`` is the CFG-combined velocity.

MLCD cuts the ``N`` steps into ``S`` segments of ``K = N / S`` steps; segment ``k`` runs from index
``b_k = k K`` to ``b_{k+1}``.  The student learns ``v_theta(x_n, t_n)`` such that one Euler-shaped jump
``x_n + (s_{b_{k+1}} - s_n) v_theta`` lands where the teacher's trajectory through ``x_n`` is at the end of
its segment.

**Timestep mapping of the few-step sampler** (``steps = S m`` with ``m`` dividing ``K``): step ``j`` (``j = 0
.. steps-1``) starts at teacher index ``i_j = j N / steps``, calls the student at the teacher's timestep
``t_{i_j}`` and sigma ``s_{i_j}``, and moves to ``s_{i_{j+1}}`` (``s_N = 0`` after the last step).  With
``m = 1`` every step is one whole segment jump.  With ``m = 2`` (2S steps) the first half-step follows the
straight line the student predicts for its segment only up to the segment's middle (DDIM-style
interpolation: for flow matching the prediction defines ``x0`` and noise, and every point between them is
``x + (s' - s) v``); the second half-step re-evaluates the student at the middle, a point inside the
segment it was trained on, and jumps to the segment's end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class FewStepSchedule:
    timesteps: tuple[float, ...]   # teacher t_0..t_{N-1}
    sigmas: tuple[float, ...]      # teacher s_0..s_N
    segments: int

    def __post_init__(self):
        N = len(self.timesteps)
        if len(self.sigmas) != N + 1:
            raise ValueError(f"need N+1 sigmas for N timesteps, found {len(self.sigmas)} and {N}")
        if self.segments < 1 or N % self.segments:
            raise ValueError(f"segments ({self.segments}) must divide the teacher's {N} steps")

    @classmethod
    def from_adapter(cls, adapter, teacher_steps: int, segments: int) -> "FewStepSchedule":
        t, s = adapter.teacher_schedule(teacher_steps)
        return cls(tuple(float(x) for x in t), tuple(float(x) for x in s), segments)

    @property
    def num_teacher_steps(self) -> int:
        return len(self.timesteps)

    @property
    def seg_len(self) -> int:
        return self.num_teacher_steps // self.segments

    def boundaries(self) -> list[int]:
        return [k * self.seg_len for k in range(self.segments + 1)]

    def segment_end(self, n: torch.Tensor) -> torch.Tensor:
        """Teacher index of the end of the segment holding index ``n`` (``0 <= n < N``)."""
        return (n // self.seg_len + 1) * self.seg_len

    def check_steps(self, steps: int) -> int:
        if steps < self.segments or steps % self.segments or self.seg_len % (steps // self.segments):
            raise ValueError(
                f"{steps} sampling steps do not fit {self.segments} segments of {self.seg_len} teacher steps: "
                f"use S*m with m dividing {self.seg_len} (e.g. {self.segments} or {2 * self.segments if self.seg_len % 2 == 0 else self.segments})"
            )
        return steps

    def indices(self, steps: int) -> list[int]:
        """Teacher indices ``i_0 = 0 < ... < i_steps = N`` visited by a ``steps``-step sampler."""
        self.check_steps(steps)
        N = self.num_teacher_steps
        return [j * N // steps for j in range(steps + 1)]

    def plan(self, steps: int) -> list[tuple[float, float, float]]:
        """``(timestep, sigma_from, sigma_to)`` for every step of the few-step sampler (the documented mapping)."""
        idx = self.indices(steps)
        return [(self.timesteps[a], self.sigmas[a], self.sigmas[b]) for a, b in zip(idx[:-1], idx[1:])]

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "sigmas": list(self.sigmas), "segments": self.segments}

    @classmethod
    def from_dict(cls, d: dict) -> "FewStepSchedule":
        return cls(tuple(d["timesteps"]), tuple(d["sigmas"]), int(d["segments"]))


def _timestep(t: float, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), float(t), device=device)


def student_guidance(cfg, adapter) -> float | None:
    """The CFG scale the student applies itself (``--student-cfg``), or ``None`` when guidance is baked in."""
    if not getattr(cfg, "student_cfg", False):
        return None
    return adapter.default_guidance if cfg.guidance_scale is None else float(cfg.guidance_scale)


def unconditional(adapter, batch: int, device) -> torch.Tensor:
    """The empty-prompt embedding for ``batch`` rows, encoded once (one row, expanded: it is the same for all)."""
    u = adapter.negative(1, device)
    return u.expand(batch, *u.shape[1:])


def student_velocity(adapter, transformer, x, t: torch.Tensor, cond, guidance: float | None = None,
                     uncond: torch.Tensor | None = None) -> torch.Tensor:
    """The student's velocity at per-row timesteps ``t``.

    ``guidance is None``: one conditional call (guidance baked in by training).  Otherwise the student is
    guided like the teacher, ``u + w (c - u)`` from its own two branches in one batched call: an untrained
    student is then exactly the teacher's plain Euler sampler, and distillation has only the jump to learn
    (a baked-in student must also learn the guided velocity, which cost the embedded 8-step runs about 2x
    the plain-Euler error on the middle segments, docs/distill/README.md).  ``uncond``: the empty-prompt
    embeddings when the caller already has them (a sampler encodes them once per call, not once per step).
    """
    if guidance is None:
        return adapter.velocity(transformer, x, t, cond).float()
    B = x.shape[0]
    if uncond is None:
        uncond = unconditional(adapter, B, x.device)
    v = adapter.velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).float()
    vc, vu = v.chunk(2)
    return vu + guidance * (vc - vu)


def cfg_velocity(adapter, transformer, x, t: float, cond, uncond, guidance: float) -> torch.Tensor:
    """The teacher's guided velocity at one timestep ``t`` for the whole batch (``guidance == 1`` or no
    ``uncond``: conditional only): :func:`student_velocity` with a scalar timestep."""
    g = None if guidance == 1.0 or uncond is None else guidance
    return student_velocity(adapter, transformer, x, _timestep(t, x.shape[0], x.device), cond, g, uncond)


@torch.no_grad()
def teacher_trajectory(adapter, transformer, noise, cond, uncond, guidance, timesteps: Sequence[float], sigmas: Sequence[float],
                       autocast=None, keep_all: bool = True, progress: bool = False) -> torch.Tensor:
    """Euler with CFG from ``noise`` over the teacher's steps; all ``N+1`` points ``(B, N+1, ...)`` or the last."""
    x = noise.float()
    pts = [x] if keep_all else None
    it = range(len(timesteps))
    for n in tqdm(it, desc="teacher", leave=False, disable=not progress):
        with autocast() if autocast else _null():
            v = cfg_velocity(adapter, transformer, x.to(noise.dtype), timesteps[n], cond, uncond, guidance)
        x = x + (sigmas[n + 1] - sigmas[n]) * v
        if keep_all:
            pts.append(x)
    return torch.stack(pts, 1) if keep_all else x


@torch.no_grad()
def few_step_sample(adapter, transformer, schedule: FewStepSchedule, noise, cond, steps: int, autocast=None,
                    guidance: float | None = None) -> torch.Tensor:
    """The student's sampler: ``steps`` calls (see the module docstring); ``guidance`` as in :func:`student_velocity`."""
    x = noise.float()
    uncond = unconditional(adapter, x.shape[0], x.device) if guidance is not None else None
    for t, s_from, s_to in schedule.plan(steps):
        with autocast() if autocast else _null():
            v = student_velocity(adapter, transformer, x, _timestep(t, x.shape[0], x.device), cond, guidance, uncond)
        x = x + (s_to - s_from) * v
    return x


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
