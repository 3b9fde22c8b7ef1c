"""The teacher's trajectories, precomputed once: where MLCD and KD draw their training points.

For ``P`` (prompt, noise) pairs the dense teacher runs its own ``N``-step Euler sampler with
classifier-free guidance and every one of the ``N+1`` points is kept.  A point ``x_n`` of the pool lies
exactly on the teacher's guided ODE trajectory, ``x_{n+1}`` *is* the teacher's solver step from it, and
``x_{b}`` at a segment boundary is the teacher's solution there, so the MLCD targets need no teacher call
during training (the expensive part, two transformer calls per CFG step, is paid once).  The pool is a
pure function of (model, prompts, seed, N, guidance): ``--resume`` rebuilds it bit for bit instead of
storing gigabytes in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .schedule import FewStepSchedule, teacher_trajectory


@dataclass
class TrajectoryPool:
    prompts: list[str]
    cond: torch.Tensor      # (P, Ltxt, D) text embeddings
    points: torch.Tensor    # (P, N+1, *latent) float32

    def __len__(self) -> int:
        return len(self.prompts)

    def nbytes(self) -> int:
        return self.points.numel() * self.points.element_size() + self.cond.numel() * self.cond.element_size()


def noise_for(seed: int, count: int, shape, device) -> torch.Tensor:
    """Gaussian noise from a private CPU generator (identical on every device and rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape), generator=g).to(device)


def build_pool(adapter, prompts: list[str], schedule: FewStepSchedule, guidance: float, seed: int, device,
               batch: int = 32, autocast=None, progress: bool = True) -> TrajectoryPool:
    """Run the dense teacher with CFG on every prompt (one noise each) and keep every point."""
    P = len(prompts)
    shape = tuple(adapter.latent_shape())
    noise = noise_for(seed, P, shape, device)
    transformer = adapter.transformer
    was_training = transformer.training
    transformer.eval()
    conds, chunks = [], []
    bar = tqdm(total=P, desc="teacher trajectories", unit="traj", disable=not progress)
    with torch.no_grad():
        for a in range(0, P, batch):
            ps = prompts[a : a + batch]
            cond = adapter.encode(ps, device)
            uncond = adapter.negative(len(ps), device)
            pts = teacher_trajectory(adapter, transformer, noise[a : a + batch], cond, uncond, guidance,
                                     schedule.timesteps, schedule.sigmas, autocast=autocast)
            conds.append(cond)
            chunks.append(pts)
            bar.update(len(ps))
    bar.close()
    transformer.train(was_training)
    return TrajectoryPool(list(prompts), torch.cat(conds), torch.cat(chunks))
