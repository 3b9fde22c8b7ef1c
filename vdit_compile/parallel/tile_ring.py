"""Tile-ring sequence parallelism: frames stay on their rank, only needed units move.

Rank ``r`` holds text (replicated) and frames ``F_r`` (frames are the sharding unit).  The op's
``grid`` + ``masks`` (any registered family, :mod:`vdit_compile.ops.args`) give the unit grid and the
unit mask ``M (H, N, N)``; units are inside frames, frame-major, so rank ``r`` owns the contiguous units
of its frames.  When the family needs token tiles the rank reorders its own frames' tokens into unit
order (the same permutation the op uses, restricted to its frames) and back at the end.  Below,
"frame" reads "unit" (a whole frame for the frame tile family, a token tile for window families):

* *Fetched rows* (every video row except the full rows of sparse heads): the rank fetches,
  from their owners, the key/value frames its local queries keep (global frames, window
  neighbours; every frame for a dense head: the dense plan falls back to a full exchange)
  and merges the partial results by log-sum-exp.
* *Full rows* (the global frames' queries of sparse heads attend every frame): sending
  them every key would overload their owner, so their *queries* go to every rank (they
  are frames every rank fetches anyway), each rank attends them to its own frames, and the
  partials return to the owner.  Text rows (replicated) are handled the same way: each rank
  attends them to its own frames (text keys counted once, on rank 0) and all partials are
  exchanged.

Traffic per site: an ``all_to_all_single`` of the neighbour frames plus one broadcast per
owner of global frames (their k/v/q, which every rank needs: sent once, not ``W-1`` times),
both asynchronous and overlapping the attention of local queries against local keys; then
an ``all_to_all_single`` returning the partial results.  Exact: partial results are
merged with their log-sum-exp (:func:`.rect.merge`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..ops.args import OpMasks, resolve
from ..ops.reorder import from_units, to_units
from .comm import broadcast, exchange
from .config import frame_split
from .rect import merge, rect_attention


@dataclass(frozen=True)
class RingPlan:
    split: tuple  # split[r] = (first unit, units) of rank r (its frames' units)
    mask: torch.Tensor  # (H, N, N) bool unit mask
    mask_fetch: torch.Tensor  # rows served by fetching keys
    mask_bcast: torch.Tensor  # full rows of sparse heads, served by broadcasting queries
    need: tuple  # need[r][s]: units of rank s whose k/v rank r fetches
    bcast: tuple  # bcast[s]: full-row query units owned by rank s
    om: OpMasks  # the resolved op arguments (unit grid, reorder)
    frame_split: tuple  # frame_split[r] = (first frame, frames) of rank r

    def owner_frames(self, r):
        """Units rank ``r`` owns (global unit indices)."""
        s, n = self.split[r]
        return list(range(s, s + n))


@lru_cache(maxsize=64)
def ring_plan(grid: tuple, world_size: int, num_heads: int, masks: str) -> RingPlan:
    """Which units move where for the op's ``grid`` and ``masks`` on ``world_size`` ranks (cached)."""
    om = resolve(num_heads, grid, masks)
    upf = om.grid.units_per_frame
    fsplit = tuple(frame_split(om.grid.num_frames, world_size))
    split = tuple((s * upf, n * upf) for s, n in fsplit)
    M = om.unit_mask().clone()
    T = M.shape[-1]
    sparse = ~M.flatten(1).all(1)  # a dense head's rows are fetched: the dense plan falls back to a full exchange
    full_rows = M.all(-1) & sparse[:, None]  # (H, N)
    MB = M & full_rows[..., None]
    MA = M & ~full_rows[..., None]
    owner = [r for r, (_, n) in enumerate(split) for _ in range(n)]
    need = []
    for r, (s0, n) in enumerate(split):
        keep = MA[:, s0 : s0 + n].any(0).any(0)  # key frames any local fetched row keeps
        frames = [j for j in range(T) if keep[j] and not (s0 <= j < s0 + n)]
        need.append(tuple(tuple(j for j in frames if owner[j] == s) for s in range(world_size)))
    rows = full_rows.any(0)
    bcast = tuple(tuple(f for f in range(s0, s0 + n) if rows[f]) for s0, n in split)
    return RingPlan(split, M, MA, MB, tuple(need), bcast, om, fsplit)


def _frames(x, frames, s0, P):
    """Rows of the given global frames from local video ``(B, H, n*P, D)``."""
    if not frames:
        return x[:, :, :0]
    idx = ((torch.as_tensor(list(frames)) - s0)[:, None] * P + torch.arange(P)[None, :]).flatten().to(x.device)
    return x.index_select(2, idx)


def _pack(out, lse):
    return torch.cat([out, lse[..., None].to(out.dtype)], dim=-1)


def _unpack(x):
    return x[..., :-1], x[..., -1]


def tile_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_prefix: int,
    text_suffix: int,
    grid: Sequence[int],
    masks: str,
    scale: float,
    parallel,
    need_lse: bool = False,
):
    """Local ``(B, H, pre + n_r*H*W + suf, D)`` in, local out (and lse when ``need_lse``)."""
    H, Lloc = q.shape[1], q.shape[2]
    W, r = parallel.world_size, parallel.rank
    pre, suf = int(text_prefix), int(text_suffix)
    plan = ring_plan(tuple(int(x) for x in grid), W, H, masks)
    ug = plan.om.grid
    nf = plan.frame_split[r][1]
    video_loc = Lloc - pre - suf
    if video_loc != nf * ug.height * ug.width:
        raise ValueError(f"tile-ring: local sequence of {Lloc} tokens does not hold {nf} whole frames of "
                         f"{ug.height}x{ug.width} tokens plus {pre + suf} text tokens")
    if not plan.om.reorder:
        return _ring(q, k, v, pre, suf, plan, scale, parallel, need_lse)
    local = ug.with_frames(nf)  # my frames' units are contiguous after the same reorder the op applies
    q, k, v = (to_units(x, pre, local) for x in (q, k, v))
    out, lse = _ring(q, k, v, pre, suf, plan, scale, parallel, True)
    return from_units(out, pre, local), (from_units(lse, pre, local) if need_lse else None)


def _ring(q, k, v, pre: int, suf: int, plan: RingPlan, scale: float, parallel, need_lse: bool):
    """The ring on unit-ordered local tokens (units of ``U`` tokens play the role of frames)."""
    B, H, Lloc, D = q.shape
    Dv = v.shape[-1]
    W, r = parallel.world_size, parallel.rank
    s0 = plan.split[r][0]
    video_loc = Lloc - pre - suf
    P = plan.om.grid.unit_tokens
    vid = slice(pre, pre + video_loc)
    qv, kv, vv = q[:, :, vid], k[:, :, vid], v[:, :, vid]
    local = plan.owner_frames(r)

    # exchange 1 (async): the k/v frames each rank needs from me (all-to-all), and my global frames
    # (k, v and their full-row queries, needed by every rank) broadcast once instead of sent W-1 times
    chunks, recv = [], []
    for t in range(W):
        want = [f for f in plan.need[t][r] if f not in plan.bcast[r]] if t != r else []
        chunks.append(torch.cat([_frames(kv, want, s0, P).reshape(-1), _frames(vv, want, s0, P).reshape(-1)]))
        recv.append(B * H * P * len([f for f in plan.need[r][t] if f not in plan.bcast[t]]) * (D + Dv) if t != r else 0)
    pending = exchange(chunks, recv, parallel, "ring_kv", async_op=True)
    shared = {}
    for src in range(W):
        if plan.bcast[src]:
            fr = plan.bcast[src]
            if src == r:
                payload = torch.cat([_frames(x, fr, s0, P).reshape(-1) for x in (kv, vv, qv)])
            else:
                payload = q.new_empty(B * H * P * len(fr) * (D + Dv + D))
            shared[src] = (broadcast(payload, src, parallel, "ring_global", async_op=True), payload)

    # overlapped: local queries against text + local frames; text queries against local frames
    text_k = torch.cat([k[:, :, :pre], k[:, :, Lloc - suf :]], dim=2)
    text_v = torch.cat([v[:, :, :pre], v[:, :, Lloc - suf :]], dim=2)
    own = rect_attention(qv, torch.cat([text_k, kv], 2), torch.cat([text_v, vv], 2), local, pre + suf, local, plan.mask, P, scale)
    text_q = torch.cat([q[:, :, :pre], q[:, :, Lloc - suf :]], dim=2)
    tk = pre + suf if r == 0 else 0
    text_own = rect_attention(text_q, torch.cat([text_k[:, :, :tk], kv], 2), torch.cat([text_v[:, :, :tk], vv], 2), None, tk, local, plan.mask, P, scale)

    got = pending.wait()
    fk, fv, fframes, remote_q = [], [], [], {}
    for s in range(W):
        if s == r:
            continue
        frames = [f for f in plan.need[r][s] if f not in plan.bcast[s]]
        m = len(frames)
        a = B * H * m * P * D
        fk.append(got[s][:a].view(B, H, m * P, D))
        fv.append(got[s][a:].view(B, H, m * P, Dv))
        fframes.extend(frames)
        if s in shared:
            work, buf = shared[s]
            work.wait()
            g = len(plan.bcast[s])
            a, b = B * H * g * P * D, B * H * g * P * Dv
            fk.append(buf[:a].view(B, H, g * P, D))
            fv.append(buf[a : a + b].view(B, H, g * P, Dv))
            fframes.extend(plan.bcast[s])  # the mask keeps only what local rows need
            remote_q[s] = buf[a + b :].view(B, H, g * P, D)
    if r in shared:
        shared[r][0].wait()
    parts = [own]
    if fframes:
        parts.append(rect_attention(qv, torch.cat(fk, 2), torch.cat(fv, 2), local, 0, fframes, plan.mask_fetch, P, scale))

    # full rows of other owners against my frames, and my text partial, go back (exchange 2)
    back, recv = [], []
    text_part = _pack(*text_own)
    for t in range(W):
        if t == r:
            back.append(text_part.new_empty(0))
            recv.append(0)
            continue
        pieces = [text_part.reshape(-1)]
        if t in remote_q:
            pieces.append(_pack(*rect_attention(remote_q[t], kv, vv, list(plan.bcast[t]), 0, local, plan.mask_bcast, P, scale)).reshape(-1))
        back.append(torch.cat(pieces))
        recv.append(B * H * (pre + suf + len(plan.bcast[r]) * P) * (Dv + 1))
    got = exchange(back, recv, parallel, "ring_partials").wait()
    text_parts = [text_own]
    g = len(plan.bcast[r])
    if g:
        idx = torch.cat([torch.arange((f - s0) * P, (f - s0 + 1) * P) for f in plan.bcast[r]]).to(q.device)
    for s in range(W):
        if s == r:
            continue
        nt = B * H * (pre + suf) * (Dv + 1)
        text_parts.append(_unpack(got[s][:nt].view(B, H, pre + suf, Dv + 1)))
        if g:
            o, l = _unpack(got[s][nt:].view(B, H, g * P, Dv + 1))
            po = own[0].new_zeros(own[0].shape).index_copy_(2, idx, o)
            pl = torch.full_like(own[1], float("-inf")).index_copy_(2, idx, l)
            parts.append((po, pl))
    out_v, lse_v = merge(parts)
    out_t, lse_t = merge(text_parts)
    out = torch.cat([out_t[:, :, :pre], out_v, out_t[:, :, pre:]], dim=2).to(q.dtype)
    lse = torch.cat([lse_t[:, :, :pre], lse_v, lse_t[:, :, pre:]], dim=2)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, (lse if need_lse else None)
