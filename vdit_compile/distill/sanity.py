"""Method check without a GPU: does MLCD beat the teacher's own few-step Euler on held-out noise?

    python -m vdit_compile.distill.sanity --steps 400

On the tiny random Wan model (``TinyAdapter``) with a 16-step CFG teacher cut into 2 segments, it
prints the RMS distance to the teacher's 16-step result on 32 held-out (prompt, noise) pairs for:
the teacher's plain Euler at 2 and 4 steps, the untrained student on the segment mapping, and the MLCD
student (raw and EMA) at 2 and 4 (= 2S) steps.  Quality of real videos needs the embedded model and
the GPU (``vdit_compile.distill.proof``); this only checks the objective does what it should.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from .adapter import TinyAdapter
from .config import DistillConfig
from .losses import mlcd_loss
from .pool import build_pool, noise_for
from .schedule import FewStepSchedule, few_step_sample, teacher_trajectory
from .trainer import StageTrainer, autocast_factory, ema_update


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pool", type=int, default=128)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    ad = TinyAdapter()
    cfg = DistillConfig.smoke("unused", teacher_steps=16, segments=2, batch_size=16, lr=5e-4, warmup_steps=10,
                              ckpt_every=10**9, log_every=50)
    sch = FewStepSchedule.from_adapter(ad, cfg.teacher_steps, cfg.segments)
    t0 = time.time()
    pool = build_pool(ad, ad.sample_prompts(a.pool, 0), sch, 3.0, 0, "cpu", batch=64, progress=False)
    print(f"pool of {a.pool} teacher trajectories: {time.time() - t0:.1f} s")
    hp, hn = ad.sample_prompts(32, 99), noise_for(7, 32, ad.latent_shape(), "cpu")
    hc, hu = ad.encode(hp, "cpu"), ad.negative(32, "cpu")
    ref = teacher_trajectory(ad, ad.transformer, hn, hc, hu, 3.0, sch.timesteps, sch.sigmas, keep_all=False)
    rms = lambda x: float((x - ref).pow(2).mean().sqrt())  # noqa: E731
    for S in (2, 4):
        t, s = ad.teacher_schedule(S)
        print(f"teacher Euler {S} steps (CFG): {rms(teacher_trajectory(ad, ad.transformer, hn, hc, hu, 3.0, t.tolist(), s.tolist(), keep_all=False)):.4f}")
    student = copy.deepcopy(ad.transformer).train()
    target, ema = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for S in (2, 4):
            print(f"untrained student {S} steps: {rms(few_step_sample(ad, student, sch, hn, hc, S)):.4f}")
    auto = autocast_factory(torch.device("cpu"), "fp32")
    N = sch.num_teacher_steps

    def after(i):
        ema_update(target, student, cfg.target_decay)
        ema_update(ema, student, cfg.ema_decay)

    tr = StageTrainer("mlcd", tempfile.mkdtemp(), student, {}, lambda m, i, n: mlcd_loss(ad, m, target, pool, sch, i, n, cfg, auto),
                      lambda g, B: (torch.randint(len(pool), (B,), generator=g), torch.randint(N, (B,), generator=g)),
                      after, a.steps, cfg.lr, cfg, torch.device("cpu"))
    tr.run(progress=True)
    print(f"MLCD: {a.steps} steps in {tr.train_seconds:.1f} s; loss {[round(h['loss'], 4) for h in tr.history]}")
    with torch.no_grad():
        for S in (2, 4):
            print(f"MLCD student {S} steps: raw {rms(few_step_sample(ad, student, sch, hn, hc, S)):.4f}, "
                  f"EMA {rms(few_step_sample(ad, ema, sch, hn, hc, S)):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
