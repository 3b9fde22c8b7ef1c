"""``--mlcd-steps 0``: the step count is fitted to the time box once, the decay ends at the box, resume keeps it.

The trainer's clock is replaced by a fake one that advances a fixed amount per reading, so the fitted count
is exact arithmetic instead of a race with the machine's load.
"""
import copy
import os
import signal
import types

import pytest
import torch

from vdit_compile.distill import DistillConfig
from vdit_compile.distill import trainer as trainer_mod
from vdit_compile.distill.checkpoint import latest_checkpoint
from vdit_compile.distill.config import DistillConfigError
from vdit_compile.distill.losses import mlcd_loss
from vdit_compile.distill.trainer import Interrupted, StageTrainer, autocast_factory, lr_factor


class FakeClock:
    """``perf_counter`` that moves ``tick`` seconds per call: a step lasts one ``tick`` (the loop times it from one reading to the next)."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now


@pytest.fixture(scope="module")
def setup(tiny_pool):
    adapter, sch, pool = tiny_pool
    cfg = DistillConfig.smoke("unused", lr=2e-3, warmup_steps=5, ckpt_every=1000, lr_decay="cosine", log_every=1)
    return adapter, cfg, sch, pool


def _fixed(B):
    idx, n = torch.arange(B) % 8, torch.tensor([0, 1, 3, 5, 2, 7, 4, 6])[:B]
    return lambda gen, b: (idx, n)


def _trainer(setup, run_dir, student, max_seconds, on_step=None):
    adapter, cfg, sch, pool = setup
    auto = autocast_factory(torch.device("cpu"), "fp32")
    frozen = copy.deepcopy(student).requires_grad_(False)

    def loss_fn(m, i, n):
        if on_step is not None:
            on_step()
        return mlcd_loss(adapter, m, frozen, pool, sch, i, n, cfg, auto)

    return StageTrainer("mlcd", run_dir, student, {}, loss_fn, _fixed(cfg.batch_size), lambda s: None, 0, cfg.lr, cfg,
                        torch.device("cpu"), max_seconds=max_seconds)


def test_step_count_is_fitted_once_and_the_decay_ends_at_the_box(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=FakeClock(0.01).perf_counter))
    student = copy.deepcopy(setup[0].transformer).train()
    tr = _trainer(setup, tmp_path, student, max_seconds=1.0)
    tr.run(progress=False)
    # 10 ms a step; rate measured over steps 10..40 = 100/s; 0.6 s left, 97% of it -> 58 more steps
    assert tr.auto_total and tr.total == tr.decay_total == 40 + int(0.97 * 0.6 * 100)
    assert tr.step == tr.total and not tr.stopped_early
    lrs = [h["lr"] for h in tr.history]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert max(lrs) == pytest.approx(setup[1].lr, rel=1e-6)
    # before the count is known the schedule is warm-up then flat; after, it is the cosine to that count
    for h in tr.history:
        if h["step"] > tr.calib_steps:
            assert h["lr"] == pytest.approx(setup[1].lr * lr_factor(h["step"], 5, tr.total, "cosine"), abs=1e-12)


def test_resume_keeps_the_fitted_count_and_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    base = setup[0].transformer
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=FakeClock(0.01).perf_counter))
    ref = copy.deepcopy(base).train()
    tr_ref = _trainer(setup, tmp_path / "ref", ref, max_seconds=1.0)
    tr_ref.run(progress=False)

    calls = {"n": 0}

    def term_at_60():
        calls["n"] += 1
        if calls["n"] == 60:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler records it; the step finishes, then it saves

    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=FakeClock(0.01).perf_counter))
    cut = copy.deepcopy(base).train()
    with pytest.raises(Interrupted):
        _trainer(setup, tmp_path / "cut", cut, max_seconds=1.0, on_step=term_at_60).run(progress=False)
    # the resumed process runs on a machine twice as fast: the count must come from the checkpoint, not a new fit
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=FakeClock(0.005).perf_counter))
    again = copy.deepcopy(base).train()
    tr = _trainer(setup, tmp_path / "cut", again, max_seconds=1.0)
    tr.restore(latest_checkpoint(tmp_path / "cut"))
    assert tr.step == 60 and tr.total == tr_ref.total
    tr.run(progress=False)
    assert tr.step == tr_ref.total
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_no_step_count_and_no_time_box_is_refused(setup, tmp_path):
    student = copy.deepcopy(setup[0].transformer)
    with pytest.raises(ValueError, match="no time box"):
        _trainer(setup, tmp_path, student, max_seconds=0.0)
    with pytest.raises(DistillConfigError, match="--mlcd-max-minutes"):
        DistillConfig.smoke(tmp_path / "r", mlcd_steps=0).validate()
    with pytest.raises(DistillConfigError, match=">= 0"):
        DistillConfig.smoke(tmp_path / "r", kd_steps=-3).validate()
    DistillConfig.smoke(tmp_path / "r", mlcd_steps=0, mlcd_max_minutes=0.5).validate()
    # a stage that does not run needs no time box
    DistillConfig.smoke(tmp_path / "r", kd_steps=0, stages="mlcd").validate()
