"""How a frame-sharded dimension travels through one tensor operation.

A :class:`Shard` says which dimension of a value is split by frames and how: along it the
full value holds ``pre`` text entries, ``T * unit`` video entries (``unit`` per frame) and
``suf`` text entries; this rank holds ``pre + n * unit + suf`` of them (its ``n`` frames).
The functions here map a Shard through views, permutations, indexing and concatenation,
or raise :class:`Unshardable` when the operation would mix frames (the pass then leaves the
model unsharded with a warning: never silently wrong).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


class Unshardable(Exception):
    """The graph cannot be sharded by frames safely; the message says where and why."""


@dataclass(frozen=True)
class Shard:
    dim: int
    pre: int
    suf: int
    unit: int

    def full(self, T: int) -> int:
        return self.pre + T * self.unit + self.suf

    def local(self, n: int) -> int:
        return self.pre + n * self.unit + self.suf

    def at(self, dim: int) -> "Shard":
        return replace(self, dim=dim)


def map_view(s: Shard, gin: tuple, gout: tuple, T: int, n: int) -> tuple[Shard, list[int]]:
    """Shard of a reshape from global shape ``gin`` to ``gout``, and the local output shape."""
    d = s.dim
    left = math.prod(gin[:d])
    size = gin[d]
    acc, dd = 1, 0
    while dd < len(gout) and acc < left:
        acc *= gout[dd]
        dd += 1
    while dd < len(gout) and acc == left and gout[dd] == 1 and size != 1:
        dd += 1  # skip inserted singleton dims
    if acc != left or dd >= len(gout):
        raise Unshardable(f"reshape {tuple(gin)} -> {tuple(gout)} merges the frame-sharded dim {d} with the dims before it")
    a = gout[dd]
    if a == size:
        out = s.at(dd)
    elif s.pre or s.suf:
        raise Unshardable(f"reshape {tuple(gin)} -> {tuple(gout)} splits or merges a dim holding text and frames")
    elif a < size:
        rest = size // a
        if size % a or a % T or s.unit % rest:
            raise Unshardable(f"reshape {tuple(gin)} -> {tuple(gout)} splits dim {d} inside frames")
        out = Shard(dd, 0, 0, a // T)
    else:
        merged, k = size, d + 1
        while merged < a and k < len(gin):
            merged *= gin[k]
            k += 1
        if merged != a:
            raise Unshardable(f"reshape {tuple(gin)} -> {tuple(gout)} regroups dim {d} irregularly")
        out = Shard(dd, 0, 0, s.unit * (a // size))
    local = list(gout)
    local[dd] = out.local(n)
    return out, local


def map_permute(s: Shard, gshape: tuple, fn) -> Shard:
    """Where dim ``s.dim`` goes under a shape-only op (permute, transpose, squeeze, ...).

    The op runs on a meta tensor of the global shape whose sharded dim is a marker size.
    """
    marker = 9973
    shape = list(gshape)
    shape[s.dim] = marker
    out = list(fn(torch.empty(shape, device="meta")).shape)
    if out.count(marker) != 1:
        raise Unshardable(f"cannot follow the frame-sharded dim through a shape op ({tuple(gshape)} -> {tuple(out)})")
    return s.at(out.index(marker))


def normalize_index(idx, ndim: int) -> list:
    """Expand a getitem index into one entry per input dim (``None`` entries kept as inserts)."""
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out = []
    for i in idx:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - consumed))
        else:
            out.append(i)
    consumed_now = sum(1 for i in out if i is not None)
    out.extend([slice(None)] * (ndim - consumed_now))
    return out


def map_getitem(s: Shard, idx, ndim: int, T: int, n: int):
    """``(new index, Shard or None)`` for ``x[idx]``; ``None``: the result holds text only (unsharded)."""
    entries = normalize_index(idx, ndim)
    in_dim, out_dim, new = 0, 0, []
    result = s
    for e in entries:
        if e is None:
            new.append(None)
            out_dim += 1
            continue
        if isinstance(e, torch.fx.Node) or isinstance(e, torch.Tensor):
            if in_dim == s.dim:
                raise Unshardable("tensor indexing along the frame-sharded dim")
            raise Unshardable("tensor indexing of a frame-sharded value")
        if in_dim == s.dim:
            if isinstance(e, int) or not isinstance(e, slice) or e.step not in (None, 1):
                raise Unshardable(f"index {e!r} along the frame-sharded dim")
            result, e = _map_slice(s, e, T, n, out_dim)
        if not isinstance(e, int):
            out_dim += 1
        new.append(e)
        in_dim += 1
    return tuple(new), result


def _map_slice(s: Shard, e: slice, T: int, n: int, out_dim: int):
    full = s.full(T)
    start, stop, _ = e.indices(full)
    bounds = {0: 0, s.pre: s.pre, s.pre + T * s.unit: s.pre + n * s.unit, full: s.local(n)}
    if start not in bounds or stop not in bounds or stop < start:
        raise Unshardable(f"slice {e} along the frame-sharded dim does not cut at text/video boundaries")
    vid0, vid1 = s.pre, s.pre + T * s.unit
    has_video = start <= vid0 and stop >= vid1 and T * s.unit > 0
    if not has_video:
        if start < vid1 and stop > vid0:
            raise Unshardable(f"slice {e} cuts inside the video tokens")
        return None, slice(bounds[start], bounds[stop])  # text only: replicated
    pre = max(0, s.pre - start)
    suf = max(0, stop - vid1)
    return Shard(out_dim, pre, suf, s.unit), slice(bounds[start], bounds[stop])
