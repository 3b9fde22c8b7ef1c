"""The MLCD and KD objectives.

**Distance.**  ``pseudo_huber``: per sample ``sqrt(mean(d^2) + c^2) - c`` (iCT, Song & Dhariwal 2023) with
``c = 0.03`` in RMS velocity units: quadratic for the small residuals near convergence, linear (an RMS
norm) for large ones, so the few badly-predicted points that consistency training always has early on
(mostly near segment starts, where the jump is longest) do not dominate the gradient the way they would
under MSE.  ``mse`` is available for comparison.

**Where the distance is measured (the weighting).**  The student's jump is
``x_hat = x_n + (s_e - s_n) v``; we compare ``v`` against the *velocity* that would land on the target,
``(target - x_n) / (s_e - s_n)``.  That is the jumped-latent error weighted by ``1 / (s_e - s_n)``: every
point in a segment counts equally in the units the teacher was trained in, whereas an unweighted latent
error would all but ignore points close to the segment end (their jump is short) and be dominated by the
segment starts.

**MLCD target.**  Consistency: from the pool point ``x_n`` the teacher's solver takes ``skip`` Euler steps
(with CFG; precomputed in the pool) to ``x_{n'}``, then the target network (an EMA of the student, no
gradient) jumps from ``x_{n'}`` to the segment end; when ``n'`` reaches the end, the target is the teacher's
own point there (the boundary condition).  Anchor: the teacher's trajectory point at the segment end,
which the pool holds exactly; weighted by ``anchor_weight`` it speeds convergence under small training
budgets and does not bias the fixed point (both targets agree on the teacher's trajectory).
``consistency_weight`` scales the consistency part.  The two agree only for a perfect student: for one
of limited capacity (or early in training) the consistency target inherits the target network's own
jump error, so on the points the sampler visits the anchor is the unbiased target and the consistency
term a bootstrapped estimate of it.  Lowering ``consistency_weight`` trades the consistency property
away from the visited points for accuracy on them; at 0 the target network is not even evaluated (run D
on the H200: 22% less time per step).

**KD.**  The sparse student's velocity against the frozen dense few-step student's at the same point,
same distance.
"""
from __future__ import annotations

import torch

from .schedule import student_guidance, student_velocity, unconditional


def distance(diff: torch.Tensor, kind: str = "pseudo_huber", c: float = 0.03) -> torch.Tensor:
    """Mean over the batch of the per-sample distance of ``diff`` (any shape ``(B, ...)``)."""
    ms = diff.float().pow(2).flatten(1).mean(1)
    if kind == "mse":
        return ms.mean()
    return (torch.sqrt(ms + c * c) - c).mean()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def mlcd_loss(adapter, student, target_net, pool, schedule, idx: torch.Tensor, n: torch.Tensor, cfg, autocast) -> tuple[torch.Tensor, dict]:
    """MLCD loss on the pool points ``(idx, n)``; returns the loss and its two parts for logging."""
    device = pool.points.device
    idx, n = idx.to(device), n.to(device)
    t = torch.tensor(schedule.timesteps, device=device)
    s = torch.tensor(schedule.sigmas, device=device)
    e = schedule.segment_end(n)
    n2 = torch.minimum(n + cfg.skip, e)
    x_n, x_e, x_n2 = pool.points[idx, n], pool.points[idx, e], pool.points[idx, n2]
    cond = pool.cond[idx]
    g = student_guidance(cfg, adapter)
    unc = unconditional(adapter, len(idx), device) if g is not None else None
    with autocast():
        v = student_velocity(adapter, student, x_n, t[n], cond, g, unc)
    span = _bcast(s[e] - s[n], x_n)
    anchor = distance(v - (x_e - x_n) / span, cfg.loss, cfg.huber_c)
    if cfg.consistency_weight == 0:
        return cfg.anchor_weight * anchor, {"consistency": float("nan"), "anchor": float(anchor.detach())}
    with torch.no_grad():
        with autocast():
            v_t = student_velocity(adapter, target_net, x_n2, t[n2.clamp(max=len(schedule.timesteps) - 1)], cond, g, unc)
        jumped = x_n2 + _bcast(s[e] - s[n2], x_n2) * v_t
        target = torch.where(_bcast(n2 == e, x_n2), x_e, jumped)
    cons = distance(v - (target - x_n) / span, cfg.loss, cfg.huber_c)
    loss = cfg.consistency_weight * cons + cfg.anchor_weight * anchor
    return loss, {"consistency": float(cons.detach()), "anchor": float(anchor.detach())}


def kd_loss(adapter, sparse, dense, pool, schedule, idx: torch.Tensor, n: torch.Tensor, cfg, autocast) -> tuple[torch.Tensor, dict]:
    """Sparse few-step student vs the frozen dense few-step student, velocity at pool points."""
    device = pool.points.device
    idx, n = idx.to(device), n.to(device)
    t = torch.tensor(schedule.timesteps, device=device)
    x_n, cond = pool.points[idx, n], pool.cond[idx]
    g = student_guidance(cfg, adapter)
    unc = unconditional(adapter, len(idx), device) if g is not None else None
    with torch.no_grad():
        with autocast():
            v_d = student_velocity(adapter, dense, x_n, t[n], cond, g, unc)
    with autocast():
        v_s = student_velocity(adapter, sparse, x_n, t[n], cond, g, unc)
    loss = distance(v_s - v_d, cfg.loss, cfg.huber_c)
    with torch.no_grad():
        rel = (v_s - v_d).float().norm() / v_d.float().norm().clamp_min(1e-12)
    return loss, {"rel_err": float(rel)}
