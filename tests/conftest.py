"""Shared fixtures: the tiny random model's teacher pool, built once per session (the distillation tests use it)."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pool():
    """(adapter, schedule, pool) of the tiny random model at the smoke config's sizes (8 teacher steps, S = 2)."""
    from vdit_compile.distill import DistillConfig
    from vdit_compile.distill.adapter import TinyAdapter
    from vdit_compile.distill.pool import build_pool
    from vdit_compile.distill.schedule import FewStepSchedule

    torch.manual_seed(0)
    adapter = TinyAdapter()
    cfg = DistillConfig.smoke("unused")
    sch = FewStepSchedule.from_adapter(adapter, cfg.teacher_steps, cfg.segments)
    pool = build_pool(adapter, adapter.sample_prompts(cfg.pool_size, 0), sch, 3.0, 0, "cpu", progress=False)
    return adapter, sch, pool
