"""Tile shapes per GPU generation and head dim: a FIXED TABLE (not ``triton.autotune``).

Why a table: the visit lists depend on the block shape, so autotuning would rebuild them
per candidate and pick a winner on whatever shape came first (often a tiny test).  The
sm90 rows were chosen by ``python benchmarks/attention.py --tune`` on an H100 and then an H200 (see
BENCHMARKS.md for the sweeps and dates); the sm80 rows are conservative shapes that fit the
smaller shared memory of A100/4090-class parts (untuned: no such GPU was available).
``KernelOptions.tile_config="fwd=128,64,4,3;dkdv=64,64,4,3;dq=64,64,4,3"`` overrides every head dim
(``fwd_tma=...`` the TMA forward's row, which defaults to ``fwd``);
``KernelOptions.tile_table="table.json"`` (written by the ``--tune`` sweep: ``{"96": {"fwd": [..4 ints..],
...}}``) replaces rows of the current GPU's generation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from .options import current


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query tokens per block
    block_n: int  # key tokens per block
    num_warps: int
    num_stages: int
    #: register cap per thread (Triton's ``maxnreg``; 0: the compiler's choice).  Why: uncapped, every forward row
    #: sits at the 255-register cap, which leaves one 8-warp CTA per SM at D = 128 and nothing to overlap its
    #: softmax with (BENCHMARKS.md item 2); a cap of 128 buys a second CTA at the price of a few spills (run 7 on an
    #: H200: 11-12% faster at D = 128; the dense mask at 0.88-0.92x of cuDNN there, against 0.75x on the H100 with
    #: the old uncapped rows).
    maxnreg: int = 0

    def launch(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts


@dataclass(frozen=True)
class KernelConfigs:
    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig
    #: forward on the Hopper TMA path (:mod:`._fwd_tma`); ``None``: the ``fwd`` row.  Its own row because
    #: TMA loads change what fits (no pointer registers, staged tiles in shared memory); tuned in runs 4 and 7.
    fwd_tma: TileConfig | None = None
    #: the automatic choice takes the TMA forward at this head dim only for masks keeping at most this share
    #: of the score matrix (forcing TMA still works): 1.0 always, 0.0 never.  Why it exists: with the uncapped
    #: rows of run 4 (H100) TMA won on the sparse masks and lost on the dense one at D = 128; with the capped rows
    #: of run 7 (H200) it wins both, so every table row is 1.0 now.
    tma_max_kept: float = 1.0

    @property
    def tma_fwd(self) -> TileConfig:
        return self.fwd_tma or self.fwd


def _c(*a):
    return TileConfig(*a)


# (arch, head-dim bucket) -> configs.  Head-dim bucket: 64 (<= 64), 96 (<= 96), 128 (<= 256).
TABLE = {
    # History first (H100, 2026-11-25; the H200 rows below replaced them where they say so).
    # D=96 from the osp-29f g1w0 sweep (fwd 128x64/4w/3st 6.85 ms vs
    # 128x128/8w/3st 7.99 ms; backward 64x64/4w/3st). D=128 from the wan14b-81f g1w0 sweep of 12:37 UTC:
    # fwd 256x64/8w/3st 40.9 ms (128x64/4w/3st, the old row, 56.6 ms: it spilled), dk/dv 32x64/4w/3st 134.2 ms
    # (was 150.4), dq 64x32/4w/3st 143.0 ms (was 149.7). D=64 from the cogvideox5b-49f g1w0 sweep: fwd and dk/dv
    # keep 128x64/4w/3st and 64x64/4w/3st (fastest), dq 64x32/4w/3st 9.07 ms (was 9.37).
    # TMA forward rows, run 4 (14:33 UTC, `--tune --tune-kinds fwd_tma`, g1w0): D=64 64x64/4w/4st 3.39 ms (portable
    # row 4.35 ms in run 3; 128x64/4w/3st on TMA 4.25 ms); D=128 128x128/8w/2st 40.93 ms (128x64/8w/3st 42.43,
    # 256x64/8w/3st 44.73; 128x128/8w/3st does not fit shared memory) -- but in the benchmark the portable kernel
    # beat it at D=128 on the dense masks (wan 264.7 vs 276.5 ms, hunyuan 393.9 vs 422.2 ms) while TMA won 3 of 4
    # sparse cases (hunyuan g0w0 20.97 vs 23.02, g1w0 43.28 vs 45.66, wan g1w0 40.85 vs 41.50; lost wan g0w0 15.28
    # vs 14.67 ms): D=128 takes TMA only for masks keeping <= half of the scores.
    # H200, 2026-12-03 (run 7, `--tune --tune-kinds fwd fwd_tma dkdv dq`, g1w0): register caps (fifth number).
    # D=128: fwd and fwd_tma 128x64/8w/2st capped at 128 registers (2 CTAs per SM): portable 37.13 ms vs 41.78 for the
    # old 256x64/8w/3st row, TMA 36.08 vs 41.15 for the old 128x128/8w/2st; the capped TMA row also beat the portable
    # one on the dense mask (wan14b 229.3 vs 235.4 ms), so D=128 now takes TMA for every mask (tma_max_kept 1.0).
    # D=64: dk/dv 32x64/4w/3st capped 128 8.79 ms (64x64/4w/3st 9.15), dq 64x32/4w/3st capped 128 9.11 (uncapped 9.13,
    # level); TMA forward keeps 64x64/4w/4st (3.39 ms; capped 3.50). D=96: TMA (and portable) forward 128x64/8w/3st
    # capped 128, 6.39 ms (128x64/4w/3st 6.59); backward rows unchanged (capped ones 2-60% slower).
    ("sm90", 64): KernelConfigs(fwd=_c(128, 64, 8, 2, 128), dkdv=_c(32, 64, 4, 3, 128), dq=_c(64, 32, 4, 3, 128),
                                fwd_tma=_c(64, 64, 4, 4)),
    ("sm90", 96): KernelConfigs(fwd=_c(128, 64, 8, 3, 128), dkdv=_c(64, 64, 4, 3), dq=_c(64, 64, 4, 3),
                                fwd_tma=_c(128, 64, 8, 3, 128)),
    ("sm90", 128): KernelConfigs(fwd=_c(128, 64, 8, 2, 128), dkdv=_c(32, 64, 4, 3), dq=_c(64, 32, 4, 3),
                                 fwd_tma=_c(128, 64, 8, 2, 128)),
    # sm80 (A100 164 KB / 4090 100 KB shared memory): untuned, sized to fit 100 KB.
    ("sm80", 64): KernelConfigs(fwd=_c(128, 64, 4, 2), dkdv=_c(64, 64, 4, 2), dq=_c(64, 64, 4, 2)),
    ("sm80", 96): KernelConfigs(fwd=_c(128, 64, 4, 2), dkdv=_c(64, 64, 4, 2), dq=_c(64, 64, 4, 2)),
    ("sm80", 128): KernelConfigs(fwd=_c(64, 64, 4, 2), dkdv=_c(64, 64, 4, 2), dq=_c(64, 64, 4, 2)),
}

#: Small tiles for the CPU interpreter (many blocks per frame in tiny tests).
INTERPRET = KernelConfigs(fwd=_c(16, 16, 1, 1), dkdv=_c(16, 32, 1, 1), dq=_c(32, 16, 1, 1))


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 96 if head_dim <= 96 else 128


def _parse_override(text: str, base: KernelConfigs) -> KernelConfigs:
    parts = dict(base.__dict__)
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, vals = item.partition("=")
        if name not in parts:
            raise ValueError(f"tile_config: unknown kernel {name!r}; expected fwd, fwd_tma, dkdv or dq")
        nums = [int(x) for x in vals.split(",")]
        if len(nums) not in (4, 5):
            raise ValueError(f"tile_config: {item!r} needs block_m,block_n,num_warps,num_stages[,maxnreg]")
        parts[name] = TileConfig(*nums)
    return KernelConfigs(**parts)


@lru_cache(maxsize=4)
def _table_file(path: str) -> dict:
    with open(path) as fh:
        raw = json.load(fh)
    return {int(b): KernelConfigs(**{k: (float(v) if k == "tma_max_kept" else TileConfig(*v)) for k, v in kinds.items()})
            for b, kinds in raw.items()}


def get_configs(head_dim: int, device) -> KernelConfigs:
    """Configs for ``head_dim`` on ``device`` (a CUDA device, or CPU under the interpreter)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        base = INTERPRET
    else:
        major, _ = torch.cuda.get_device_capability(dev)
        base = TABLE[("sm90" if major >= 9 else "sm80", _bucket(head_dim))]
        table_path = current().tile_table
        if table_path:
            base = _table_file(table_path).get(_bucket(head_dim), base)
    override = current().tile_config
    return _parse_override(override, base) if override else base
