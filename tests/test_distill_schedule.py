"""The few-step scheduler maps timesteps as documented (vdit_compile/distill/schedule.py)."""
import pytest
import torch

from vdit_compile.distill.adapter import ModelAdapter, TinyAdapter
from vdit_compile.distill.schedule import FewStepSchedule, few_step_sample


def _schedule(N=12, S=3):
    return FewStepSchedule.from_adapter(TinyAdapter(), N, S)


def test_segments_and_indices_follow_the_documented_rule():
    sch = _schedule(12, 3)
    assert sch.seg_len == 4 and sch.boundaries() == [0, 4, 8, 12]
    assert sch.indices(3) == [0, 4, 8, 12]
    assert sch.indices(6) == [0, 2, 4, 6, 8, 10, 12]       # 2S: segment middles inserted
    assert sch.indices(12) == list(range(13))               # S*K: the teacher's own grid
    n = torch.arange(12)
    assert sch.segment_end(n).tolist() == [4] * 4 + [8] * 4 + [12] * 4


def test_plan_uses_the_teachers_timesteps_and_sigmas():
    adapter = TinyAdapter()
    sch = FewStepSchedule.from_adapter(adapter, 12, 3)
    import copy

    ref = copy.deepcopy(adapter.scheduler)
    ref.set_timesteps(12)
    t, s = ref.timesteps.tolist(), ref.sigmas.tolist()
    assert s[-1] == 0.0
    for steps in (3, 6):
        idx = sch.indices(steps)
        plan = sch.plan(steps)
        assert len(plan) == steps
        for j, (tj, s_from, s_to) in enumerate(plan):
            assert tj == pytest.approx(t[idx[j]]) and s_from == pytest.approx(s[idx[j]]) and s_to == pytest.approx(s[idx[j + 1]])
        assert plan[-1][2] == 0.0


@pytest.mark.parametrize("steps", [4, 5, 7])
def test_unusable_step_counts_are_refused(steps):
    with pytest.raises(ValueError, match="sampling steps do not fit"):
        _schedule(12, 3).indices(steps)


def test_segments_must_divide_teacher_steps():
    with pytest.raises(ValueError, match="must divide"):
        _schedule(12, 5)


class _Oracle(torch.nn.Module):
    """Exact velocity of a flow whose data point is the constant c: v = (x - c) / sigma."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.seen = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.seen.append(float(timestep[0]))
        sigma = timestep.view(-1, 1, 1, 1, 1) / 1000.0
        return ((hidden_states - self.c) / sigma,)


@pytest.mark.parametrize("steps", [3, 6])
def test_few_step_sampler_walks_the_mapping_exactly(steps):
    """With the exact velocity every Euler-shaped jump lands on the data: S and 2S both reach c exactly,
    and the sampler calls the model at exactly the documented timesteps."""
    sch = _schedule(12, 3)
    c = torch.full((1, 3, 2, 4, 4), 0.25)
    oracle = _Oracle(c)
    x = few_step_sample(ModelAdapter(), oracle, sch, torch.randn(1, 3, 2, 4, 4), None, steps)
    torch.testing.assert_close(x, c, rtol=0, atol=1e-5)
    assert oracle.seen == pytest.approx([p[0] for p in sch.plan(steps)])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_draw_puts_the_asked_share_of_rows_on_sampler_visited_indices(fraction):
    """The MLCD/KD batch: ``round(fraction * B)`` rows start where the S/2S-step samplers call the student."""
    from vdit_compile.distill.stages import _draw

    sch = FewStepSchedule(tuple(float(x) for x in range(48, 0, -1)), tuple(x / 48 for x in range(48, -1, -1)), 8)
    visited = sorted(set(sch.indices(8)[:-1]) | set(sch.indices(16)[:-1]))
    assert visited == list(range(0, 48, 3))
    draw = _draw(sch, 100, visited, fraction)
    gen = torch.Generator().manual_seed(0)
    B, on, total = 64, 0, 0
    for _ in range(50):
        idx, n = draw(gen, B)
        assert idx.shape == n.shape == (B,) and int(idx.min()) >= 0 and int(idx.max()) < 100
        assert int(n.min()) >= 0 and int(n.max()) < 48
        k = round(fraction * B)
        assert all(int(v) % 3 == 0 for v in n[:k])          # the forced rows are visited indices
        on += int((n % 3 == 0).sum())
        total += B
    # the uniform rows hit a visited index 1/3 of the time: expected share = f + (1 - f) / 3
    assert abs(on / total - (fraction + (1 - fraction) / 3)) < 0.03
    # the same generator state gives the same batch (resume is bit for bit)
    a = draw(torch.Generator().manual_seed(5), B)
    b = draw(torch.Generator().manual_seed(5), B)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_visited_fraction_out_of_range_is_refused():
    from vdit_compile.distill.config import DistillConfig, DistillConfigError

    with pytest.raises(DistillConfigError, match="visited-fraction"):
        DistillConfig(visited_fraction=1.5).validate()


def test_segment_errors_compare_one_jump_with_one_euler_step():
    """The diagnostic: a student equal to the teacher (no CFG to bake in) matches plain Euler on every segment."""
    from vdit_compile.distill.segments import format_rows, segment_errors

    torch.manual_seed(0)
    adapter = TinyAdapter()
    sch = FewStepSchedule.from_adapter(adapter, 8, 4)
    prompts = adapter.sample_prompts(3, 0)
    rows = segment_errors(adapter, adapter.transformer, sch, prompts, guidance=1.0)
    assert [r["segment"] for r in rows] == [0, 1, 2, 3]
    assert all(r["sigma_from"] > r["sigma_to"] for r in rows)
    for r in rows:
        assert r["euler_rms"] > 0 and r["student_rms"] == pytest.approx(r["euler_rms"], rel=1e-5)
    # with CFG the Euler step uses guidance and the (undistilled) student does not: they differ
    rows_cfg = segment_errors(adapter, adapter.transformer, sch, prompts, guidance=3.0)
    assert any(abs(r["student_over_euler"] - 1) > 1e-3 for r in rows_cfg)
    assert format_rows(rows).count("\n") == 5
    # a --student-cfg student guides itself: undistilled, it *is* the plain Euler sampler on every segment
    rows_self = segment_errors(adapter, adapter.transformer, sch, prompts, guidance=3.0, student_cfg=True)
    for r, rc in zip(rows_self, rows_cfg):
        assert r["euler_rms"] == rc["euler_rms"] and r["student_rms"] == pytest.approx(r["euler_rms"], rel=1e-5)


def test_student_velocity_guides_like_the_teacher_with_per_row_timesteps():
    from vdit_compile.distill.schedule import student_velocity

    torch.manual_seed(1)
    adapter = TinyAdapter()
    prompts = adapter.sample_prompts(3, 0)
    cond, uncond = adapter.encode(prompts, "cpu"), adapter.negative(3, "cpu")
    x = torch.randn(3, *adapter.latent_shape())
    t = torch.tensor([900.0, 500.0, 100.0])
    got = student_velocity(adapter, adapter.transformer, x, t, cond, 2.5)
    # oracle: each row on its own, its two branches as separate unbatched calls, combined by hand
    def row(i, emb):
        return adapter.velocity(adapter.transformer, x[i:i + 1], t[i:i + 1], emb[i:i + 1]).double()

    want = torch.cat([row(i, uncond) + 2.5 * (row(i, cond) - row(i, uncond)) for i in range(3)]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    baked = student_velocity(adapter, adapter.transformer, x, t, cond, None)
    torch.testing.assert_close(baked, adapter.velocity(adapter.transformer, x, t, cond).float())
    assert not torch.allclose(baked, got)
