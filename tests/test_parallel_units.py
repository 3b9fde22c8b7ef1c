"""Single-process parts of sequence parallelism: shard arithmetic, the rectangular exact
attention and log-sum-exp merge, the tile-ring communication plan, and the graph pass's
rules and safe fallback (a stub rank: no collective runs here)."""
import warnings

import pytest
import torch

from vdit_compile import TileMask
from vdit_compile.masks.tile import frame_masks
from vdit_compile.parallel import Parallel, frame_split, shard_graph
from vdit_compile.parallel.rect import merge, rect_attention
from vdit_compile.parallel.shard_rules import Shard, Unshardable, map_getitem, map_view
from vdit_compile.parallel.tile_ring import ring_plan


def test_frame_split_uneven_and_errors():
    assert frame_split(7, 4) == [(0, 2), (2, 2), (4, 2), (6, 1)]
    assert frame_split(8, 2) == [(0, 4), (4, 4)]
    with pytest.raises(ValueError, match="3 frame\\(s\\) cannot feed 4 ranks"):
        frame_split(3, 4)


def test_parallel_needs_a_process_group_and_a_known_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        Parallel(None, "ring")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        Parallel(None, "tile-ring")


def _oracle(q, k, v, q_ids, k_ids, fmask, scale):
    """Dense masked softmax over the explicit (H, Lq, Lk) token mask; empty rows -> (0, -inf)."""
    H = q.shape[1]
    fm = fmask.expand(H, *fmask.shape[-2:])
    allowed = (q_ids[:, None] < 0) | (k_ids[None, :] < 0) | fm[:, q_ids.clamp(min=0)][:, :, k_ids.clamp(min=0)]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].nan_to_num(neginf=0.0)).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("q_frames,k_text,k_frames,names", [
    ([1, 2], 3, [0, 2, 4], ["g1w0", "dense", "g0w1"]),
    ([4], 0, [0, 1], ["g0w0", "g1w0", "g0w1"]),  # frame 4 keeps no key of frame 0/1 for head 0: empty rows
    (None, 2, [3, 4], ["g1w0", "g0w0", "dense"]),  # text rows see every key given
])
def test_rect_attention_matches_masked_dense(q_frames, k_text, k_frames, names):
    P, T, D = 3, 5, 4
    fmask = frame_masks([TileMask.parse(n) for n in names], T)
    g = torch.Generator().manual_seed(len(k_frames))
    Lq = 4 if q_frames is None else len(q_frames) * P
    q = torch.randn(2, 3, Lq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, k_text + len(k_frames) * P, D, generator=g, dtype=torch.float64) for _ in range(2))
    q_ids = torch.full((Lq,), -1) if q_frames is None else torch.tensor(q_frames).repeat_interleave(P)
    k_ids = torch.cat([torch.full((k_text,), -1), torch.tensor(k_frames).repeat_interleave(P)])
    out, lse = rect_attention(q, k, v, q_frames, k_text, k_frames, fmask, P, 0.4)
    ref_o, ref_l = _oracle(q, k, v, q_ids, k_ids, fmask, 0.4)
    torch.testing.assert_close(out, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_l, rtol=1e-12, atol=1e-12)


def test_merge_of_disjoint_key_sets_is_exact():
    P, T = 2, 6
    fmask = frame_masks([TileMask(1, 1), TileMask(dense=True)], T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3 * P, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 2 + T * P, 8, generator=g, dtype=torch.float64) for _ in range(2))
    qf = [1, 3, 5]
    whole = rect_attention(q, k, v, qf, 2, list(range(T)), fmask, P, 0.3)
    a = rect_attention(q, k[:, :, : 2 + 2 * P], v[:, :, : 2 + 2 * P], qf, 2, [0, 1], fmask, P, 0.3)
    b = rect_attention(q, k[:, :, 2 + 2 * P :], v[:, :, 2 + 2 * P :], qf, 0, [2, 3, 4, 5], fmask, P, 0.3)
    out, lse = merge([a, b])
    torch.testing.assert_close(out, whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, whole[1], rtol=1e-12, atol=1e-12)


def test_ring_plan_fetches_only_global_and_window_frames():
    frames = (24, 2, 2, 2, 2)  # 93f-like 24 frames, whole-frame units
    plan = ring_plan(frames, 4, 2, "g1w0")
    assert plan.need[0] == ((), (), (), ())  # rank 0 holds the global frame
    assert all(plan.need[r][0] == (0,) and sum(map(len, plan.need[r])) == 1 for r in range(1, 4))
    assert plan.bcast == ((0,), (), (), ())  # frame 0's full rows are computed everywhere
    win = ring_plan(frames, 4, 2, "g0w1")
    assert [sum(map(len, n)) for n in win.need] == [1, 2, 2, 1]  # neighbours across shard boundaries only
    dense = ring_plan(frames, 4, 2, "dense")
    assert all(sum(map(len, dense.need[r])) == 18 for r in range(4))  # dense: every other frame (full exchange)


def test_ring_plan_on_token_tiles_fetches_only_the_window_units():
    # 8 frames of 4x4 tokens in 2x2 tiles (4 units a frame), 2 ranks of 4 frames (16 units each)
    plan = ring_plan((8, 4, 4, 2, 2), 2, 1, "win3d-t1h0w0")
    assert plan.split == ((0, 16), (16, 16))
    # a radius-1 window in time: each rank fetches only the boundary frame's 4 units from the other
    assert plan.need[0] == ((), (16, 17, 18, 19)) and plan.need[1] == ((12, 13, 14, 15), ())
    assert plan.bcast == ((), ())
    sp = ring_plan((8, 4, 4, 2, 2), 2, 1, "spatial-h0w0-g1")  # own tile through time + global frame 0
    assert sp.bcast == ((0, 1, 2, 3), ())  # frame 0's units are full rows
    # rank 1 needs frame 0 (global, broadcast) and the same tile of rank 0's other frames
    assert set(sp.need[1][0]) >= {0, 1, 2, 3} and 4 in sp.need[1][0] and 5 in sp.need[1][0]


def test_shard_rules():
    s = Shard(1, 0, 0, 16)  # (B, T*16, C) with T=4, this rank 2 frames
    out, local = map_view(s, (1, 64, 8), (1, 4, 4, 4, 8), T=4, n=2)
    assert out == Shard(1, 0, 0, 1) and local == [1, 2, 4, 4, 8]
    out, local = map_view(Shard(1, 0, 0, 1), (1, 4, 16, 8), (1, 64, 8), T=4, n=2)
    assert out == Shard(1, 0, 0, 16) and local == [1, 32, 8]
    with pytest.raises(Unshardable):
        map_view(Shard(1, 3, 0, 16), (1, 67, 8), (1, 67 * 8), T=4, n=2)
    idx, text = map_getitem(Shard(1, 3, 0, 16), (slice(None), slice(None, 3)), 3, T=4, n=2)
    assert text is None and idx[1] == slice(0, 3)
    idx, vid = map_getitem(Shard(1, 3, 0, 16), (slice(None), slice(3, None)), 3, T=4, n=2)
    assert vid == Shard(1, 0, 0, 16) and idx[1] == slice(3, 35)
    with pytest.raises(Unshardable, match="boundaries"):
        map_getitem(Shard(1, 0, 0, 16), (slice(None), slice(5, None)), 3, T=4, n=2)


class _StubRank:
    """Enough of Parallel for the pass to plan rank 1 of 2 without a process group."""

    mode, world_size, rank = "tile-ring", 2, 1

    def local_frames(self, T):
        return frame_split(T, 2)[1]


class _Tiny(torch.nn.Module):
    def __init__(self, mix_frames):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, (1, 2, 2), (1, 2, 2))
        self.qkv = torch.nn.Linear(8, 24)
        self.mix = mix_frames

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)  # (B, T*P, 8) frame-major
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        o = torch.ops.vdit.tile_attention(q, k, v, 0, 0, [x.shape[2], 2, 2, 2, 2], "g1w0", 0.5)[0]
        h = h + o.transpose(1, 2).flatten(2)
        return h.cumsum(1) if self.mix else h * 2


def _captured(mix):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(shard_graph(gm, _StubRank(), example_inputs=example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(_Tiny(mix), backend=backend, fullgraph=True)(torch.randn(1, 3, 4, 4, 4))
    return graphs[0], [str(w.message) for w in caught if "sequence parallelism" in str(w.message)]


def test_pass_rewrites_attention_and_gathers_the_output():
    gm, warned = _captured(mix=False)
    code = gm.code
    assert not warned
    assert "vdit_parallel_attention" in code and "vdit_gather_tokens" in code and "vdit_shard_tokens" in code
    assert "vdit.tile_attention" not in code


def test_pass_leaves_frame_mixing_graphs_whole_with_a_warning():
    gm, warned = _captured(mix=True)
    assert warned and "cumsum" in warned[0] and "reduces over the frame-sharded dim" in warned[0]
    assert "vdit_parallel_attention" not in gm.code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (memory-efficient SDPA blocks)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_rect_attention_cuda_blocks_match_cpu_float64(dtype, tol):
    P, T = 64, 6
    fmask = frame_masks([TileMask(1, 0), TileMask(dense=True), TileMask(0, 1), TileMask(2, 0)], T)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 2 * P, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 4, 5 + 4 * P, 64, generator=g, dtype=torch.float64) for _ in range(2))
    args = ([2, 3], 5, [0, 1, 3, 5], fmask, P, 0.125)
    ref_o, ref_l = rect_attention(q, k, v, *args)
    with torch.no_grad():
        out, lse = rect_attention(*(t.to("cuda", dtype) for t in (q, k, v)), *args)
    assert float((out.double().cpu() - ref_o).norm() / ref_o.norm()) < tol
    torch.testing.assert_close(lse.double().cpu(), ref_l, rtol=tol, atol=tol)


class _TextTiny(torch.nn.Module):
    """Text of per-call length before the video (Mochi-like): the op gets a symbolic text length."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, (1, 2, 2), (1, 2, 2))
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, text):
        h = torch.cat([text, self.embed(x).flatten(2).transpose(1, 2)], 1)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        o = torch.ops.vdit.tile_attention(q, k, v, text.shape[1], 0, [x.shape[2], 2, 2, 2, 2], "g1w0", 0.5)[0]
        return h + o.transpose(1, 2).flatten(2)


def test_pass_leaves_per_call_text_graphs_whole_with_a_warning():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(shard_graph(gm, _StubRank(), example_inputs=example_inputs))
        return gm.forward

    torch._dynamo.reset()
    text = torch.randn(1, 5, 8)
    torch._dynamo.mark_dynamic(text, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(_TextTiny(), backend=backend, fullgraph=True)(torch.randn(1, 3, 4, 4, 4), text)
    warned = [str(w.message) for w in caught if "sequence parallelism" in str(w.message)]
    assert warned and "vdit_parallel_attention" not in graphs[0].code
