"""The transport of sequence parallelism: ``torch.distributed.all_to_all_single`` (and ``broadcast``).

One primitive, :func:`exchange`, sends a (possibly empty) flat chunk to every rank and
receives one from every rank, with uneven sizes, optionally asynchronously so computation
can overlap it.  Every byte sent to *another* rank is counted in ``parallel.stats`` (the
benchmark reports bytes per step).  :func:`gather_dim` builds the final all-gather of
frame-sharded outputs on top of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class Pending:
    """An in-flight exchange: ``wait()`` returns the received chunks, one per source rank."""

    def __init__(self, work, recv: torch.Tensor, sizes: Sequence[int]):
        self._work, self._recv, self._sizes = work, recv, list(sizes)

    def wait(self) -> list[torch.Tensor]:
        if self._work is not None:
            self._work.wait()
        return list(torch.split(self._recv, self._sizes))


def exchange(chunks: Sequence[torch.Tensor], recv_sizes: Sequence[int], parallel, kind: str, async_op: bool = False) -> Pending:
    """Send ``chunks[r]`` (flattened) to rank ``r``; receive ``recv_sizes[s]`` elements from rank ``s``."""
    W = parallel.world_size
    if len(chunks) != W or len(recv_sizes) != W:
        raise ValueError(f"exchange needs one chunk and one receive size per rank ({W}), found {len(chunks)} and {len(recv_sizes)}")
    dtype, device = chunks[0].dtype, chunks[0].device
    flat = [c.reshape(-1).to(dtype) for c in chunks]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    itemsize = send.element_size()
    parallel.stats.add(kind, sum(f.numel() for r, f in enumerate(flat) if r != parallel.rank) * itemsize)
    work = dist.all_to_all_single(
        recv, send, [int(s) for s in recv_sizes], [f.numel() for f in flat], group=parallel.group, async_op=async_op
    )
    return Pending(work if async_op else None, recv, recv_sizes)


def broadcast(x: torch.Tensor, src: int, parallel, kind: str, async_op: bool = False):
    """``torch.distributed.broadcast`` from group rank ``src``; counted once, at the source (its payload)."""
    if parallel.rank == src:
        parallel.stats.add(kind, x.numel() * x.element_size())
    src_global = dist.get_global_rank(parallel.group, src) if parallel.group is not dist.group.WORLD else src
    work = dist.broadcast(x, src_global, group=parallel.group, async_op=async_op)
    return work if async_op else None


def gather_dim(x: torch.Tensor, dim: int, local_sizes: Sequence[int], parallel, kind: str = "gather_output") -> list[torch.Tensor]:
    """All-gather ``x`` whose ``dim`` has size ``local_sizes[r]`` on rank ``r``: returns every rank's piece."""
    if x.shape[dim] != local_sizes[parallel.rank]:
        raise ValueError(f"gather_dim: local size {x.shape[dim]} on dim {dim} != expected {local_sizes[parallel.rank]}")
    moved = x.movedim(dim, 0).contiguous()
    rest = moved.shape[1:]
    per = rest.numel()
    got = exchange([moved] * parallel.world_size, [n * per for n in local_sizes], parallel, kind).wait()
    return [g.view(n, *rest).movedim(0, dim) for g, n in zip(got, local_sizes)]
