"""Sequence-parallel step time of an Open-Sora-Plan-1.2-shaped video DiT (torchrun, one process per GPU).

    torchrun --nproc-per-node 1 benchmarks/parallel.py --out benchmarks/results/parallel.jsonl
    torchrun --nproc-per-node 4 benchmarks/parallel.py --out benchmarks/results/parallel.jsonl
    python benchmarks/parallel.py --report benchmarks/results/parallel.jsonl      # table + speed-ups

The model is the one of ``/work/shared/gpu/e2e_probe.py``: diffusers Wan blocks, 32 layers,
24 heads x 96, ffn 9216, 512 text tokens of width 4096, random bf16 weights; 29 and 93 video
frames at 720p are 8 and 24 latent frames of 90x160 (45x80 = 3600 tokens per frame).  For each
frame count, plan (dense / tile) and mode (Ulysses / tile-ring; one process: no parallelism),
it times whole transformer steps (median of ``--reps`` after ``--warmup``), counts the bytes each
rank sends per step, and appends one JSON row per case (rank 0).  Speed-up over one GPU is
computed in the report from the one-process rows of the same frames and plan.  All processes
use the same backend (``--backend eager`` by default: the parallel graph runs eagerly because
its collectives are not traced by inductor, so the one-GPU baseline does too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OSP = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=96, in_channels=8, out_channels=8, text_dim=4096,
           freq_dim=256, ffn_dim=9216, num_layers=32, rope_max_seq_len=1024)
VIDEO_FRAMES = {8: 29, 24: 93}  # latent frames -> video frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 24], help="latent frames (8 = 29f, 24 = 93f)")
    p.add_argument("--height", type=int, default=90, help="latent height (90 = 720p)")
    p.add_argument("--width", type=int, default=160, help="latent width (160 = 1280)")
    p.add_argument("--plans", nargs="+", default=["dense", "g1w0"])
    p.add_argument("--modes", nargs="+", default=["ulysses", "tile-ring"])
    p.add_argument("--layers", type=int, default=OSP["num_layers"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", default="eager", choices=["eager", "inductor", "auto"])
    p.add_argument("--out", default="benchmarks/results/parallel.jsonl")
    p.add_argument("--report", default=None, help="print the table of a results file and exit")
    p.add_argument("--predict", action="store_true", help="print the bytes each rank would send per step and exit")
    return p.parse_args(argv)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup, reps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
    return times


def run(args) -> list[dict]:
    from diffusers import WanTransformer3DModel

    import vdit_compile
    from vdit_compile import TileMask
    from vdit_compile.parallel import Parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    par_any = Parallel.from_env("ulysses") if world > 1 else None
    rank = par_any.rank if par_any else 0
    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = WanTransformer3DModel(**{**OSP, "num_layers": args.layers}).to(dtype).eval()
    rows = []
    for T in args.frames:
        g = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(1, OSP["in_channels"], T, args.height, args.width, device=dev, dtype=dtype, generator=g)
        enc = torch.randn(1, 512, OSP["text_dim"], device=dev, dtype=dtype, generator=g)
        t = torch.tensor([500], device=dev)
        for plan in args.plans:
            for mode in (args.modes if world > 1 else ["none"]):
                par = Parallel(None, mode) if world > 1 else None
                vdit_compile.optimize(model, plan=TileMask.parse(plan), parallel=par, backend=args.backend)

                def step():
                    with torch.no_grad():
                        return model(hidden_states=x, encoder_hidden_states=enc, timestep=t, return_dict=False)[0]

                error = None
                try:
                    step()  # compile + first run
                    if par:
                        par.stats.reset()
                    times = time_steps(step, args.warmup, args.reps)
                except Exception as exc:  # noqa: BLE001 - recorded (e.g. Ulysses heads, out of memory)
                    error, times = f"{type(exc).__name__}: {exc}", []
                vdit_compile.restore(model)
                sent = torch.tensor([par.stats.total / max(1, args.warmup + args.reps) if par else 0.0], device=dev)
                if par:
                    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
                row = dict(frames_latent=T, video_frames=VIDEO_FRAMES.get(T), tokens=T * (args.height // 2) * (args.width // 2),
                           plan=plan, mode=mode, world_size=world, step_ms=statistics.median(times) * 1e3 if times else None,
                           step_ms_all=[s * 1e3 for s in times], max_bytes_sent_per_rank_per_step=float(sent.item()),
                           layers=args.layers, backend=args.backend, error=error,
                           device=torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
                           torch=torch.__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           command=" ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv))
                rows.append(row)
                if rank == 0:
                    print(json.dumps({k: row[k] for k in ("video_frames", "plan", "mode", "world_size", "step_ms",
                                                          "max_bytes_sent_per_rank_per_step", "error")}), flush=True)
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if par_any:
        dist.destroy_process_group()
    return rows


def report(path) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    base = {(r["frames_latent"], r["plan"]): r["step_ms"] for r in rows if r["world_size"] == 1 and r["step_ms"]}
    lines = ["| video frames | tokens | plan | mode | GPUs | step ms | speed-up vs 1 GPU | MiB sent/rank/step | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["frames_latent"], r["plan"], r["mode"], r["world_size"])):
        b = base.get((r["frames_latent"], r["plan"]))
        sp = f"{b / r['step_ms']:.2f}x" if b and r["step_ms"] else "-"
        ms = f"{r['step_ms']:.0f}" if r["step_ms"] else (r["error"] or "-")[:60]
        lines.append(f"| {r['video_frames']} | {r['tokens']} | {r['plan']} | {r['mode']} | {r['world_size']} | {ms} | {sp} | "
                     f"{r['max_bytes_sent_per_rank_per_step'] / 2**20:.1f} | {r['device']} |")
    return "\n".join(lines)


def predict(args) -> str:
    """Bytes each rank would send per step, from vdit_compile.parallel.volume (no GPU, no model run)."""
    from vdit_compile import TileMask
    from vdit_compile.parallel.volume import attention_bytes

    H, D, C = OSP["num_attention_heads"], OSP["attention_head_dim"], OSP["out_channels"]
    lines = ["| video frames | plan | mode | GPUs | predicted MiB sent per rank per step (max over ranks) |", "|---|---|---|---|---|"]
    for T in args.frames:
        for plan in args.plans:
            name = TileMask.parse(plan).name
            for mode in args.modes:
                for W in (2, 4, 8):
                    if mode == "ulysses" and H % W:
                        continue
                    gather = max(n for _, n in __import__("vdit_compile.parallel", fromlist=["frame_split"]).frame_split(T, W))
                    gather_bytes = gather * C * args.height * args.width * 2 * (W - 1)
                    grid = [T, args.height // 2, args.width // 2, args.height // 2, args.width // 2]
                    per = max(attention_bytes(mode, grid, 0, 0, H, D, W, r, name) for r in range(W))
                    total = per * args.layers + gather_bytes
                    lines.append(f"| {VIDEO_FRAMES.get(T, T)} | {plan} | {mode} | {W} | {total / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.predict:
        print(predict(args))
        return 0
    run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
