"""Static report of the kernels at the tile rows in use: registers, spills, shared memory, occupancy, SASS mix.

Needs no GPU: Triton compiles for sm_90 (``GPUTarget("cuda", 90, 32)``) and the ``cuobjdump`` bundled with
Triton's NVIDIA backend reads the cubin.  Why: the H100 is lent for minutes, and what limits a kernel
(spills, one CTA per SM, how much of the instruction stream is softmax) can be read off the binary on the CPU.
To see what the GPU machine's compiler makes, run it with that Triton (3.6) on ``PYTHONPATH``, e.g.
``pip download triton==3.6.0 --no-deps -d /tmp/w && unzip -q /tmp/w/triton-3.6.0-*.whl -d /tmp/t36``, then
``PYTHONPATH=/tmp/t36 python benchmarks/compile_report.py``.

Occupancy = CTAs per SM from registers (64 K per SM) and shared memory (227 KB per CTA-usable SM on H100).
The SASS counts cover the whole kernel (both loops, prologue and epilogue), not one loop iteration.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

OPS = ["HGMMA", "MUFU.EX2", "FMNMX", "FADD", "FMUL", "FFMA", "SHFL", "BAR", "UTMALDG", "LDGSTS", "LDG", "SYNCS", "LDL", "STL"]
POINTERS = {"HeadPat": "*i32", "RowOrder": "*i32", "Offsets": "*i32", "NumUnmasked": "*i32", "NumPadTail": "*i32", "Cols": "*i32",
            "EMask": "*i8", "LSE": "*fp32", "Delta": "*fp32"}
TENSORS = ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")  # pointers of the input dtype
SMEM_PER_SM = 232448
REGS_PER_SM = 65536


def _signature(fn, consts: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in TENSORS:
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    return sig


def _cuobjdump() -> str:
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.is_file():
        raise SystemExit(f"no cuobjdump at {exe}: this Triton install has no bundled NVIDIA tools")
    return str(exe)


def report(fn, head_dim: int, parts: tuple[int, int], tile: tuple[int, ...], dtype="bf16", **extra) -> dict:
    """``tile``: block_m, block_n, num_warps, num_stages[, maxnreg] (0 or absent: no register cap)."""
    bm, bn, warps, stages, maxnreg = (*tile, 0)[:5]
    consts = dict(HEAD_D=head_dim, BD0=parts[0], BD1=parts[1], BLOCK_M=bm, BLOCK_N=bn, DOT_PREC="tf32",
                  **{"KPAD": False, **extra})
    k = triton.compile(ASTSource(fn=fn, signature=_signature(fn, consts, dtype), constexprs=consts),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {})))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    instr = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    mix = {op: sum(1 for ln in instr if re.search(r"\b" + re.escape(op) + r"\b", ln)) for op in OPS}
    smem = int(k.metadata.shared)
    ctas = min(REGS_PER_SM // (max(regs, 1) * 32 * warps), SMEM_PER_SM // smem if smem else 32, 64 // warps)
    return dict(regs=regs, stack=stack, smem_kb=smem / 1024, ctas_per_sm=ctas, warps_per_sm=ctas * warps,
                sass_lines=len(instr), **mix)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args(argv)
    from vdit_compile.kernels._bwd import tile_dkdv_kernel, tile_dq_kernel
    from vdit_compile.kernels._fwd import tile_fwd_kernel
    from vdit_compile.kernels._fwd_tma import tile_fwd_tma_kernel
    from vdit_compile.kernels.configs import TABLE
    from vdit_compile.kernels.tile_attention_triton import head_dim_parts

    print(f"triton {triton.__version__}, sm_90, {args.dtype}; tile rows of vdit_compile/kernels/configs.py")
    print("| kernel | D | tile | regs | stack B | smem KB | CTAs/SM (warps) | " + " | ".join(OPS) + " | SASS lines |")
    print("|" + "---|" * (8 + len(OPS)))
    for D in (64, 96, 128):
        row = TABLE[("sm90", D)]
        # TWO_SEG=True: the mask lookup the launcher picks when frames are at least a block long (every benchmark shape)
        for name, fn, cfg, extra in (("portable", tile_fwd_kernel, row.fwd, {"TWO_SEG": True}),
                                     ("TMA", tile_fwd_tma_kernel, row.tma_fwd, {"WS": False, "TWO_SEG": True}),
                                     ("dk/dv", tile_dkdv_kernel, row.dkdv, {"TWO_SEG": True}),
                                     ("dq", tile_dq_kernel, row.dq, {"TWO_SEG": True})):
            tile = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
            try:
                r = report(fn, D, head_dim_parts(D), tile, args.dtype, **extra)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"| {name} | {D} | {tile} | error: {type(exc).__name__}: {str(exc)[:120]} |")
                continue
            cap = f"/maxnreg {cfg.maxnreg}" if cfg.maxnreg else ""
            print(f"| {name} | {D} | {cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}st{cap} | {r['regs']} | "
                  f"{r['stack']} | {r['smem_kb']:.1f} | {r['ctas_per_sm']} ({r['warps_per_sm']}) | "
                  + " | ".join(str(r[o]) for o in OPS) + f" | {r['sass_lines']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
