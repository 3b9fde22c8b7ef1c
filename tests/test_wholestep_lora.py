"""LoRA after optimize(): load, set_adapters, fuse/unfuse and unload on the optimised embedded pipeline keep
the tile rewrite (checked against the eager LoRA'd model with the masked-dense oracle at every change),
need no re-calibration, recompile at most once per change, and restore() still works."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft", reason="LoRA loading needs peft (pip install -e '.[test]')")

from core_models import MaskedSDPA, out_of, rel_err

import vdit_compile as vc
from vdit_compile import TileMask
from vdit_compile.wholestep.lora import graphs_compiled, lora_pipeline, random_lora


def _call_order(tr, sites):
    """The oracle's site per SDPA call: Wan runs its blocks in order, self-attention (attn1, tiled) then
    cross-attention (attn2, left alone) in each.  Built from the model, not from the order in which the
    sites were discovered (graphs Dynamo already holds for this class can be reused across tests)."""
    tiled = {s.name: s for s in sites if s.tileable}
    cross = SimpleNamespace(tileable=False)
    return [x for i in range(len(tr.blocks)) for x in (tiled[f"blocks.{i}.attn1"], cross)]


def _tiny_lora_pipe(timestep: int):
    """The tiny embedded pipeline, LoRA-ready (``lora_pipeline``), and one transformer call's inputs at ``timestep``
    (seeded: both tests draw the same latents and text)."""
    from vdit_compile.models.embedded import load_pipeline

    pipe = lora_pipeline(load_pipeline(weights=None, tiny=True))
    tr = pipe.transformer
    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 3, 4, 16, 16), timestep=torch.tensor([timestep]),
              encoder_hidden_states=torch.randn(1, 8, tr.config.text_dim), return_dict=False)
    return pipe, tr, kw


def test_lora_changes_on_optimized_pipeline_keep_the_rewrite():
    pipe, tr, kw = _tiny_lora_pipe(700)
    mask = TileMask(0, 0)  # each frame attends to itself only: far from dense at 4 frames
    vc.optimize(pipe, plan=mask, progress=False)
    plan = vc.plan_of(pipe)
    with torch.no_grad():
        out0 = out_of(tr(**kw))
    sites = _call_order(tr, vc.sites_of(pipe))
    assert sum(s.tileable for s in sites) == 2
    # graphs one compilation of the forward gives (1 in a fresh process; Dynamo may split it when other
    # models of this class were compiled with graph breaks earlier in the process, e.g. with cache="fbc")
    per_compile = graphs_compiled(pipe)
    assert per_compile >= 1

    def check(what, max_new_graphs):
        g0 = graphs_compiled(pipe)
        with torch.no_grad():
            out = out_of(tr(**kw))
            eager = type(tr).forward.__get__(tr)
            with MaskedSDPA(sites, mask):
                oracle = out_of(eager(**kw))
            dense = out_of(eager(**kw))
        assert rel_err(out, oracle) < 1e-5, what
        assert rel_err(out, dense) > 1e-3, f"{what}: output equals the dense model's, the rewrite is gone"
        new = graphs_compiled(pipe) - g0
        assert new <= max_new_graphs * per_compile, f"{what}: {new} new graphs, {per_compile} per compilation"
        assert vc.plan_of(pipe) is plan  # no re-calibration
        return out

    pipe.load_lora_weights(random_lora(tr, seed=1), adapter_name="a")
    out_a = check("load a", 1)
    assert rel_err(out_a, out0) > 1e-3  # the adapter is live
    pipe.load_lora_weights(random_lora(tr, seed=2, targets=(".attn1.to_q", ".attn1.to_v")), adapter_name="b")
    check("load b", 1)
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    out_ab = check("set_adapters", 1)
    pipe.fuse_lora(adapter_names=["a", "b"])
    fused = check("fuse_lora", 1)
    torch.testing.assert_close(fused, out_ab, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()
    check("unfuse_lora", 1)
    pipe.unload_lora_weights()
    with torch.no_grad():
        torch.testing.assert_close(out_of(tr(**kw)), out0, rtol=1e-5, atol=1e-6)
    vc.restore(pipe)
    assert "forward" not in tr.__dict__
    pipe.load_lora_weights(random_lora(tr, seed=1), adapter_name="a")  # and LoRA still loads on the plain model
    with torch.no_grad():
        assert rel_err(out_of(tr(**kw)), out_a) > 1e-3  # dense attention again, so not the tiled output


def test_lora_loaded_before_optimize_is_kept():
    pipe, tr, kw = _tiny_lora_pipe(300)
    pipe.load_lora_weights(random_lora(tr, seed=4), adapter_name="a")
    vc.optimize(pipe, plan=TileMask(0, 0), calib_inputs=[kw], progress=False)
    with torch.no_grad():
        out = out_of(tr(**kw))
        with MaskedSDPA(_call_order(tr, vc.sites_of(pipe)), TileMask(0, 0)):
            oracle = out_of(type(tr).forward(tr, **kw))
    assert rel_err(out, oracle) < 1e-5
    vc.restore(pipe)


def test_fused_projections_refuse_a_lora_they_would_not_see():
    """``fuse_qkv=True`` and LoRA: adapters loaded after optimize wrap ``to_q``/``to_k``/``to_v``, which the fused
    ``to_qkv`` replaces, so the forward raises instead of ignoring them; adapters present before optimize keep the
    projections unfused (a warning), and the LoRA'd output is the plain optimised one."""
    pipe, tr, kw = _tiny_lora_pipe(700)
    vc.optimize(pipe, plan=TileMask(0, 0), progress=False, fuse_qkv=True)
    with torch.no_grad():
        tr(**kw)
    pipe.load_lora_weights(random_lora(tr, seed=1), adapter_name="a")
    with pytest.raises(RuntimeError, match="fuse_qkv=True"), torch.no_grad():
        tr(**kw)
    vc.restore(pipe)
    with torch.no_grad():
        want = out_of(tr(**kw))  # LoRA'd, unfused, eager
    with pytest.warns(UserWarning, match="carry LoRA adapters"):
        vc.optimize(pipe, plan=TileMask(dense=True), progress=False, fuse_qkv=True)
    try:
        assert not tr.blocks[0].attn1.fused_projections
        with torch.no_grad():
            torch.testing.assert_close(out_of(tr(**kw)), want, rtol=1e-4, atol=1e-4)
    finally:
        vc.restore(pipe)
        pipe.unload_lora_weights()
