"""Each stage runs a few steps on a tiny random model; its loss is finite and decreases on a fixed batch."""
import copy
import dataclasses
import json
import math

import pytest
import torch

from vdit_compile.distill import DistillConfig, load_run
from vdit_compile.distill.config import DistillConfigError
from vdit_compile.distill.losses import distance, kd_loss, mlcd_loss
from vdit_compile.distill.run import run
from vdit_compile.distill.trainer import StageTrainer, autocast_factory, ema_update


@pytest.fixture(scope="module")
def setup(tiny_pool):
    adapter, sch, pool = tiny_pool
    cfg = DistillConfig.smoke("unused", lr=2e-3, warmup_steps=1, ckpt_every=1000)
    return adapter, cfg, sch, pool


def _fixed(B):
    idx, n = torch.arange(B) % 8, torch.tensor([0, 1, 3, 5, 2, 7, 4, 6])[:B]
    return lambda gen, b: (idx, n)


def _train(tmp_path, name, model, companions, loss_fn, after, cfg, steps=12, lr=None):
    tr = StageTrainer(name, tmp_path, model, companions, loss_fn, _fixed(cfg.batch_size), after, steps, lr or cfg.lr, cfg,
                      torch.device("cpu"))
    tr.run(progress=False)
    return [h["loss"] for h in tr.history]


def test_pseudo_huber_is_l2_like_for_large_and_quadratic_for_small_residuals():
    big, small = torch.full((1, 10), 10.0), torch.full((1, 10), 1e-3)
    assert distance(big, c=0.03) == pytest.approx(10.0 - 0.03, rel=1e-4)
    assert distance(small, c=0.03) == pytest.approx(1e-6 / (2 * 0.03), rel=1e-2)
    assert distance(big, "mse") == pytest.approx(100.0)


def test_mlcd_loss_decreases_on_a_fixed_batch(setup, tmp_path):
    adapter, cfg, sch, pool = setup
    student = copy.deepcopy(adapter.transformer).train()
    target = copy.deepcopy(student).requires_grad_(False)
    auto = autocast_factory(torch.device("cpu"), "fp32")
    losses = _train(tmp_path, "mlcd", student, {"target": target},
                    lambda m, i, n: mlcd_loss(adapter, m, target, pool, sch, i, n, cfg, auto),
                    lambda s: ema_update(target, student, cfg.target_decay), cfg)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_mlcd_boundary_condition_uses_the_teachers_point(setup):
    """When the teacher's step reaches the segment end, the target is the pool's own end point: a student
    that predicts the exact jump has zero consistency loss there."""
    adapter, cfg, sch, pool = setup
    n = torch.tensor([sch.seg_len - 1, 2 * sch.seg_len - 1])  # one step before each segment end
    idx = torch.tensor([0, 1])
    s = torch.tensor(sch.sigmas)
    e = sch.segment_end(n)
    exact = (pool.points[idx, e] - pool.points[idx, n]) / (s[e] - s[n]).view(-1, 1, 1, 1, 1)

    class Exact(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            return (exact,)

    auto = autocast_factory(torch.device("cpu"), "fp32")
    loss, parts = mlcd_loss(adapter, Exact(), Exact(), pool, sch, idx, n, cfg, auto)
    assert parts["consistency"] == pytest.approx(0.0, abs=1e-6) and parts["anchor"] == pytest.approx(0.0, abs=1e-6)


def test_consistency_weight_scales_its_term_and_zero_skips_the_target_network(setup):
    adapter, cfg, sch, pool = setup
    student = copy.deepcopy(adapter.transformer).eval()
    target = copy.deepcopy(student)
    with torch.no_grad():  # a target that differs from the student, so the consistency term is not the anchor
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    auto = autocast_factory(torch.device("cpu"), "fp32")
    idx, n = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 4, 5])
    full, parts = mlcd_loss(adapter, student, target, pool, sch, idx, n, cfg, auto)
    assert parts["consistency"] != pytest.approx(parts["anchor"])
    assert float(full) == pytest.approx(parts["consistency"] + cfg.anchor_weight * parts["anchor"], rel=1e-5)
    half, p2 = mlcd_loss(adapter, student, target, pool, sch, idx, n, dataclasses.replace(cfg, consistency_weight=0.25), auto)
    assert float(half) == pytest.approx(0.25 * parts["consistency"] + parts["anchor"], rel=1e-5)

    class NeverCalled(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the target network ran with consistency_weight 0")

    only, p0 = mlcd_loss(adapter, student, NeverCalled(), pool, sch, idx, n, dataclasses.replace(cfg, consistency_weight=0.0), auto)
    assert float(only) == pytest.approx(parts["anchor"], rel=1e-5)
    with pytest.raises(DistillConfigError, match="not both 0"):
        dataclasses.replace(cfg, consistency_weight=0.0, anchor_weight=0.0).validate()


def _sparse_copy(module):
    from vdit_compile import TileMask, optimize

    return optimize(copy.deepcopy(module), plan=TileMask(0, 0))


def test_kd_loss_decreases_on_a_fixed_batch(setup, tmp_path):
    adapter, cfg, sch, pool = setup
    dense = copy.deepcopy(adapter.transformer).eval().requires_grad_(False)
    sparse = _sparse_copy(adapter.transformer).train().requires_grad_(True)
    auto = autocast_factory(torch.device("cpu"), "fp32")
    losses = _train(tmp_path, "kd", sparse, {}, lambda m, i, n: kd_loss(adapter, m, dense, pool, sch, i, n, cfg, auto),
                    lambda s: None, cfg, lr=3e-4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0], losses


def test_mlcd_run_writes_its_outputs_and_loads_as_a_few_step_pipeline(tmp_path):
    out = tmp_path / "run"
    run(DistillConfig.smoke(out, stages="mlcd"), progress=False)
    for rel in ("config.json", "schedule.json", "mlcd/weights.safetensors", "mlcd/loss.csv", "mlcd/done.json",
                "loss_curves.png", "timings.json"):
        assert (out / rel).is_file(), rel
    assert DistillConfig.load(out / "config.json").segments == 2
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["sample_steps"] == [2, 4] and len(sched["mapping"]["4"]) == 4
    # the per-segment diagnostic reads the run directory (its MLCD weights) from the command line
    from vdit_compile.distill import segments

    rows_json = tmp_path / "segments.json"
    assert segments.main([str(out), "--model", "tiny", "--teacher-steps", "8", "--segments", "2", "--prompts", "2",
                          "--device", "cpu", "--json", str(rows_json)]) == 0
    rows = json.loads(rows_json.read_text())
    assert [r["segment"] for r in rows] == [0, 1] and all(r["student_rms"] > 0 for r in rows)
    with pytest.raises(FileNotFoundError, match="mlcd/weights.safetensors"):
        segments.main([str(tmp_path / "nowhere"), "--model", "tiny", "--device", "cpu"])
    # the GPU proof driver runs the same diagnostic on each finished run and packs it with the run
    from vdit_compile.distill.proof import _segment_check

    _segment_check(out, 2, "cpu", prompts=2)
    packed = json.loads((out / "mlcd" / "segments.json").read_text())
    assert [r["segment"] for r in packed] == [0, 1] and all(r["euler_rms"] > 0 for r in packed)
    pipe = load_run(out)
    g = torch.Generator().manual_seed(0)
    for steps in (2, 4):
        frames = pipe(["red circle left", "blue square up"], num_inference_steps=steps, generator=g).frames
        assert frames.shape == (2, 4, 3, 8, 8) and torch.isfinite(frames).all()
        assert 0 <= float(frames.min()) and float(frames.max()) <= 1


def test_time_budget_ends_a_stage_early_and_says_so(setup, tmp_path):
    adapter, cfg, sch, pool = setup
    student = copy.deepcopy(adapter.transformer).train()
    auto = autocast_factory(torch.device("cpu"), "fp32")
    tr = StageTrainer("mlcd", tmp_path, student, {}, lambda m, i, n: mlcd_loss(adapter, m, student, pool, sch, i, n, cfg, auto),
                      _fixed(cfg.batch_size), lambda s: None, 50, cfg.lr, cfg, torch.device("cpu"), max_seconds=1e-9)
    tr.run(progress=False)
    assert tr.stopped_early and tr.step == 1 and tr.total == 1


def test_embedded_adapter_pieces():
    from vdit_compile.distill.loading import load_adapter
    from vdit_compile.models.embedded import data

    a = load_adapter("embedded:tiny")
    prompts = a.sample_prompts(3, seed=5)
    assert all(data.parse_caption(p) for p in prompts)  # captions of the training distribution
    cond, neg = a.encode(prompts, "cpu"), a.negative(3, "cpu")
    assert cond.shape == neg.shape and cond.shape[0] == 3 and float(neg.abs().max()) == 0.0
    assert a.latent_shape() == (3, data.NUM_FRAMES, data.HEIGHT, data.WIDTH)
    x = torch.randn(2, *a.latent_shape())
    frames = a.decode(x)
    assert frames.shape == (2, data.NUM_FRAMES, 3, data.HEIGHT, data.WIDTH) and 0 <= frames.min() and frames.max() <= 1
    t, s = a.teacher_schedule(8)
    assert t.shape == (8,) and s.shape == (9,) and s[0] == 1.0 and s[-1] == 0.0


def test_lr_factor_warms_up_then_decays_to_zero_at_the_stage_total():
    from vdit_compile.distill.trainer import lr_factor

    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert [lr_factor(i, 10, 100, "none") for i in (9, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(99, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(99, 10, 100, "linear") == pytest.approx(0.0, abs=1e-12)
    mid = 9 + 45  # halfway through the decay
    assert lr_factor(mid, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(mid, 10, 100, "linear") == pytest.approx(0.5)
    cos = [lr_factor(i, 10, 100, "cosine") for i in range(9, 100)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    with pytest.raises(ValueError, match="lr decay"):
        lr_factor(50, 10, 100, "step")


def test_trainer_logs_the_decaying_rate(setup, tmp_path):
    adapter, cfg, sch, pool = setup
    cfg = dataclasses.replace(cfg, lr_decay="linear", warmup_steps=2, log_every=1)
    student = copy.deepcopy(adapter.transformer).train()
    auto = autocast_factory(torch.device("cpu"), "fp32")
    tr = StageTrainer("mlcd", tmp_path, student, {}, lambda m, i, n: mlcd_loss(adapter, m, student, pool, sch, i, n, cfg, auto),
                      _fixed(cfg.batch_size), lambda s: None, 10, cfg.lr, cfg, torch.device("cpu"))
    tr.run(progress=False)
    lrs = [h["lr"] for h in tr.history]
    assert len(lrs) == 10 and lrs[-1] < 0.2 * cfg.lr and max(lrs) == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_bad_lr_decay_is_refused_before_training():
    with pytest.raises(DistillConfigError, match="lr-decay"):
        DistillConfig(lr_decay="exp").validate()


def test_student_cfg_run_trains_every_stage_and_samples_guided(tmp_path):
    out = tmp_path / "run"
    run(DistillConfig.smoke(out, student_cfg=True, guidance_scale=2.0), progress=False)
    assert json.loads((out / "schedule.json").read_text())["student_cfg"] is True
    for stage in ("mlcd", "kd"):
        done = json.loads((out / stage / "done.json").read_text())
        assert done["steps"] > 0 and math.isfinite(done["final_loss"])
    pipe = load_run(out)
    assert pipe.student_cfg and pipe.sparse and pipe.guidance_scale == 2.0
    prompts = ["red circle left", "blue square up"]
    a = pipe(prompts, generator=torch.Generator().manual_seed(0)).latents
    b = pipe(prompts, generator=torch.Generator().manual_seed(0), guidance_scale=2.0).latents
    c = pipe(prompts, generator=torch.Generator().manual_seed(0), guidance_scale=1.0).latents
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.allclose(a, c)
