"""``vdit_compile.Parallel``: which ranks share one generation and how attention is split.

It wraps a torch.distributed process group (or a 1-D ``DeviceMesh``): NCCL on GPU, gloo on
CPU, normally started by ``torchrun``.  There is no home-made transport; every exchange is a
torch.distributed collective (see :mod:`.comm`).

Video tokens are split *by frames*, contiguously, so each rank's shard is itself a valid
tile layout (``frame_split``).  When ``T`` is not divisible by the world size the first
``T % W`` ranks get one frame more (uneven shards, no padding: padding frames would change
attention).  Text tokens are replicated on every rank (see docs/parallel.md for why).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

MODES = ("ulysses", "tile-ring")


def frame_split(num_frames: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, count)`` frame shard of every rank; first ``T % W`` ranks get one more."""
    if num_frames < world_size:
        raise ValueError(
            f"sequence parallelism splits frames across ranks: {num_frames} frame(s) cannot feed "
            f"{world_size} ranks (need num_frames >= world size)"
        )
    base, extra = divmod(num_frames, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (r < extra)
        out.append((start, n))
        start += n
    return out


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks, per collective kind (reset by the benchmark each step)."""

    sent: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


class Parallel:
    """Sequence-parallel configuration: ``Parallel(mesh_or_group, mode="ulysses" | "tile-ring")``.

    Args:
        mesh: a 1-D ``DeviceMesh``, a ``ProcessGroup``, or ``None`` for the default (world) group.
        mode: ``"ulysses"`` (all-to-all sequence->heads, kernel unchanged; heads must be divisible
            by the world size) or ``"tile-ring"`` (frames stay put; each rank fetches only the
            key/value frames its queries keep and merges partial results by log-sum-exp).
    """

    def __init__(self, mesh=None, mode: str = "ulysses", *, group=None):
        if mode not in MODES:
            raise ValueError(f"Parallel mode must be one of {MODES}, found {mode!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Parallel needs an initialised torch.distributed process group: launch with torchrun and call "
                "torch.distributed.init_process_group (or use Parallel.from_env())"
            )
        if group is not None and mesh is not None:
            raise ValueError("give Parallel either a mesh or a group, not both")
        mesh = group if mesh is None else mesh
        if mesh is not None and hasattr(mesh, "get_group"):
            if getattr(mesh, "ndim", 1) != 1:
                raise ValueError(f"Parallel needs a 1-D DeviceMesh for sequence parallelism, found {mesh.ndim}-D")
            mesh = mesh.get_group()
        self.group = mesh if mesh is not None else dist.group.WORLD
        self.mode = mode
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.stats = CommStats()

    @classmethod
    def from_env(cls, mode: str = "ulysses") -> "Parallel":
        """Initialise the default group from torchrun's environment (NCCL with CUDA, else gloo)."""
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        return cls(None, mode)

    def split(self, num_frames: int) -> list[tuple[int, int]]:
        return frame_split(num_frames, self.world_size)

    def local_frames(self, num_frames: int) -> tuple[int, int]:
        """``(start, count)`` of this rank's frames."""
        return self.split(num_frames)[self.rank]

    def __repr__(self) -> str:
        return f"Parallel(mode={self.mode!r}, world_size={self.world_size}, rank={self.rank})"
