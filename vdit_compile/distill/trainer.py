"""One training loop for every stage: DDP, bf16 autocast, EMA, checkpoints, signals, progress, loss log.

Determinism: the training points of step ``i`` are drawn for the *global* batch from a private CPU
generator whose state is checkpointed, and rank ``r`` takes its slice, so (a) ``--resume`` continues bit
for bit on the same device and (b) ``R`` ranks with per-rank batch ``B/R`` compute the same averaged
gradient as one rank with batch ``B`` (DDP averages over ranks, the loss averages over the batch).

SIGINT / SIGTERM set a flag; the loop finishes its step, all ranks agree on stopping (an all-reduce of
the flag, so none deadlocks), rank 0 writes a checkpoint and :class:`Interrupted` is raised.  A SIGKILL
loses at most the steps since the last periodic checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import signal
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class Interrupted(RuntimeError):
    """Training stopped by a signal after writing a checkpoint."""

    def __init__(self, signum: int, path):
        super().__init__(f"stopped by signal {signum}; checkpoint written to {path}")
        self.signum, self.path = signum, path


class SignalFlag(contextlib.AbstractContextManager):
    """Install SIGINT/SIGTERM handlers that only record the signal; restore the old ones on exit."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handler(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA unless fp32 is asked; fp32 on CPU unless bf16 is asked."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_factor(i: int, warmup: int, total: int, decay: str = "none") -> float:
    """Learning-rate multiplier at optimizer step ``i``: linear warm-up, then constant or decaying to 0 at ``total``.

    Why decay: Adam's steps stay about ``lr`` long however small the gradient gets, so at a constant rate the
    weights keep jittering around the optimum; a run that must land within a fixed step budget ends on that
    jitter (docs/distill/README.md: the MLCD student's velocity error stayed near 0.1 RMS on every segment).
    The decay is a function of the step only, so ``--resume`` stays bit for bit.
    """
    w = min(1.0, (i + 1) / warmup)
    if decay == "none" or total <= warmup:
        return w
    frac = min(1.0, max(0.0, (i + 1 - warmup) / (total - warmup)))
    if decay == "cosine":
        return w * 0.5 * (1.0 + math.cos(math.pi * frac))
    if decay == "linear":
        return w * (1.0 - frac)
    raise ValueError(f"lr decay must be none, cosine or linear, found {decay!r}")


class StageTrainer:
    """Train ``model`` with ``loss_fn(model_for_forward, idx, n) -> (loss, parts)`` for ``total`` steps.

    ``companions`` are extra modules checkpointed with the model (EMA copies, targets) and updated by
    ``after_step(step)``.  ``draw(generator, batch) -> (idx, n)`` draws the global batch's points.

    ``total <= 0`` means "as many steps as the time box holds" (needs ``max_seconds``): the step rate
    measured over steps ``calib_from``..``calib_steps`` (the first steps are slow: allocator, cuDNN
    autotuning) fixes the step count once, so a decaying learning rate reaches 0 when the box ends instead
    of being cut off part-way (run C's 7.6-minute box held 3,541 steps; a guess of 20,000 would have left
    the rate at 97%).  The count is stored in every checkpoint, so a ``--resume`` after step ``calib_steps``
    uses the same schedule and stays bit for bit (one killed before it measures its rate again).
    """

    calib_from, calib_steps = 10, 40
    fill_fraction = 0.97    # of the remaining box: a margin for rate changes, so the box rarely cuts the decay

    def __init__(self, stage: str, run_dir: Path, model: torch.nn.Module, companions: dict, loss_fn, draw, after_step,
                 total: int, lr: float, cfg, device: torch.device, save_module: torch.nn.Module | None = None,
                 compile: bool = False, max_seconds: float = 0.0):
        self.stage, self.run_dir, self.model, self.companions = stage, Path(run_dir), model, companions
        self.loss_fn, self.draw, self.after_step = loss_fn, draw, after_step
        self.cfg, self.device = cfg, device
        self.auto_total = int(total) <= 0
        if self.auto_total and not max_seconds:
            raise ValueError(f"{stage}: a step count of {total} means 'fit the time box', but no time box "
                             f"(--{stage}-max-minutes) is set")
        # the loop bound while the count is unknown; the lr schedule sees 0 (warm-up only) until then
        self.total = 2**62 if self.auto_total else int(total)
        self.decay_total = 0 if self.auto_total else int(total)
        self.save_module = save_module if save_module is not None else model
        self.rank, self.world = world()
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), eps=1e-8)
        warm = max(1, cfg.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: lr_factor(i, warm, self.decay_total, cfg.lr_decay))
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + zlib.crc32(stage.encode()) % 7919)
        self.max_seconds = float(max_seconds)
        self.stopped_early = False
        self.history: list[dict] = []
        self.step = 0
        self.train_seconds = 0.0
        self.fwd = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if compile:
            self.fwd = torch.compile(self.fwd)

    # ---- checkpoint -----------------------------------------------------------------------------
    def _modules(self) -> dict:
        return {"model": self.save_module, **self.companions}

    def checkpoint(self) -> Path | None:
        path = None
        if self.rank == 0:
            state = {
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "rng": rng_state(self.gen),
                "step": self.step, "stage": self.stage, "history": self.history, "train_seconds": self.train_seconds,
                "total": self.total, "decay_total": self.decay_total,
            }
            path = save_checkpoint(self.run_dir, self.stage, self.step, self._modules(), state, keep=self.cfg.keep_checkpoints)
            self.write_log()
        if self.world > 1:
            dist.barrier()
        return path

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path, self._modules(), map_location=self.device)
        if state["stage"] != self.stage:
            raise RuntimeError(f"checkpoint {path} belongs to stage {state['stage']!r}, not {self.stage!r}")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"], self.gen)
        self.step, self.history = int(state["step"]), list(state["history"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.auto_total and state.get("decay_total"):
            self.total, self.decay_total = int(state["total"]), int(state["decay_total"])

    def _fit_time_box(self) -> None:
        """Fix the step count from the rate measured since step ``calib_from`` (once, ``total <= 0`` only)."""
        s0, t0 = self._calib_mark
        rate = (self.step - s0) / max(self.train_seconds - t0, 1e-9)
        left = max(0.0, self.max_seconds - self.train_seconds)
        self.total = self.decay_total = max(self.step + 1, self.step + int(self.fill_fraction * left * rate))

    def write_log(self) -> None:
        """``RUN/<stage>/loss.csv`` (every logged step), written atomically."""
        if not self.history:
            return
        keys = list(self.history[0].keys())
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_bytes(self.run_dir / self.stage / "loss.csv", buf.getvalue().encode())

    # ---- loop -----------------------------------------------------------------------------------
    def _fit_time_box_agreed(self) -> None:
        """:meth:`_fit_time_box` on rank 0, broadcast, so every rank runs the same number of steps."""
        self._fit_time_box()
        if self.world > 1:
            t = torch.tensor([self.total], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(t, 0)
            self.total = self.decay_total = int(t.item())

    def _stop_agreed(self, flag: SignalFlag) -> tuple[int, bool]:
        """(signal to stop on, time budget spent), agreed by all ranks (MAX over ranks)."""
        over = bool(self.max_seconds) and self.train_seconds > self.max_seconds
        if self.world == 1:
            return flag.signum, over
        t = torch.tensor([flag.signum, int(over)], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0].item()), bool(t[1].item())

    def run(self, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        B = cfg.batch_size
        if B % self.world:
            raise ValueError(f"--batch-size {B} must be divisible by the {self.world} ranks")
        per = B // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        self._calib_mark = None
        known = not self.auto_total or self.decay_total  # the bar has no total until the time box is fitted
        bar = tqdm(total=self.total if known else None, initial=self.step, desc=self.stage, unit="step",
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        self.model.train()
        with SignalFlag() as flag:
            while self.step < self.total:
                t0 = time.perf_counter()
                idx, n = self.draw(self.gen, B)
                loss, parts = self.loss_fn(self.fwd, idx[lo:hi], n[lo:hi])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.stage}: loss became {float(loss)} at step {self.step}")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                self.sched.step()
                self.after_step(self.step)
                self.step += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                if self.auto_total and not self.decay_total:
                    if self._calib_mark is None and self.step >= self.calib_from:
                        self._calib_mark = (self.step, self.train_seconds)
                    elif self._calib_mark is not None and self.step >= self.calib_steps:
                        self._fit_time_box_agreed()
                        bar.total = self.total
                        bar.refresh()
                lval = float(loss.detach())
                if self.world > 1:
                    lt = torch.tensor([lval], device=self.device if self.device.type == "cuda" else "cpu")
                    dist.all_reduce(lt)
                    lval = float(lt.item()) / self.world
                if self.step % cfg.log_every == 0 or self.step == self.total or self.step == 1:
                    self.history.append({"step": self.step, "loss": lval, "lr": self.sched.get_last_lr()[0],
                                         "grad_norm": float(gnorm), "seconds": round(self.train_seconds, 4), **parts})
                bar.set_postfix(loss=f"{lval:.4f}", refresh=False)
                bar.update(1)
                signum, over = self._stop_agreed(flag)
                if over and self.step < self.total:
                    # time budget spent: the stage ends here (recorded in done.json), like a shorter run
                    self.stopped_early, self.total = True, self.step
                    break
                if signum:
                    path = self.checkpoint()
                    bar.close()
                    raise Interrupted(signum, path)
                if self.step % cfg.ckpt_every == 0 and self.step < self.total:
                    self.checkpoint()
        bar.close()
        self.checkpoint()
        return self.history
