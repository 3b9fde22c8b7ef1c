"""Generate a video with an optimised pipeline, optionally sequence-parallel over several processes.

    torchrun --nproc-per-node 4 tools/generate.py --model embedded --plan plan.json \\
        --prompt "a red circle moving right" --parallel tile-ring --out video.gif
    python tools/generate.py --model embedded:random --plan g1w0 --prompt "..."      # one process

MODEL is any spec ``vdit-compile`` accepts (``embedded``, a diffusers path, ``Class:config.json``,
``module:factory``); it must give a pipeline.  ``--plan`` is a plan JSON or a uniform mask name
(``g1w0``, ``dense``).  Every rank runs the same pipeline with the same seed; inside the
transformer the video tokens are split by frames across ranks (docs/parallel.md), so all ranks
end with the same video and rank 0 writes it.  Prints per-step time and bytes communicated.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vdit_compile  # noqa: E402
from vdit_compile import TileMask  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="model spec (default: embedded)")
    p.add_argument("--plan", default=None, help="plan JSON, or a uniform mask: g<G>w<W> / dense (default: dense)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--parallel", choices=["none", "ulysses", "tile-ring"], default="none")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=None, help="num_frames passed to the pipeline")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--out", default="video.gif", help="output .gif/.mp4 (rank 0), plus a .json with timings")
    p.add_argument("--save-tensor", default=None, help="also save the frames as a torch .pt file (rank 0)")
    return p.parse_args(argv)


def _plan(spec):
    if spec is None:
        return TileMask(dense=True)
    if Path(spec).exists():
        return spec
    try:
        return TileMask.parse(spec)
    except ValueError as exc:
        raise SystemExit(f"--plan {spec!r}: not a file and not a mask name ({exc})")


def _setup(mode):
    if mode == "none" or int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        if mode != "none":
            print(f"--parallel {mode} with one process: running unsharded", file=sys.stderr)
        return None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from vdit_compile.parallel import Parallel

    par = Parallel.from_env(mode)
    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    return par, dev


def _save(frames, path: Path):
    if isinstance(frames, torch.Tensor):
        from vdit_compile.models.embedded.pipeline import save_gif, save_mp4

        return (save_mp4 if path.suffix == ".mp4" else save_gif)(frames.float().cpu(), path)
    from diffusers.utils import export_to_gif, export_to_video

    frames = frames[0] if isinstance(frames, (list, tuple)) and isinstance(frames[0], (list, tuple)) else frames
    return (export_to_video if path.suffix == ".mp4" else export_to_gif)(frames, str(path))


def main(argv=None) -> int:
    args = parse_args(argv)
    par, dev = _setup(args.parallel)
    rank = par.rank if par else 0
    from vdit_compile.models.spec import is_pipeline, load_model

    pipe = load_model(args.model)
    if not is_pipeline(pipe):
        raise SystemExit(f"--model {args.model!r} gives a bare {type(pipe).__name__}; generate needs a pipeline")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = pipe.to(dev, dtype) if dtype else pipe.to(dev)
    vdit_compile.optimize(pipe, plan=_plan(args.plan), parallel=par)
    kw = {k: v for k, v in dict(num_frames=args.frames, height=args.height, width=args.width,
                                guidance_scale=args.guidance).items() if v is not None}
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    step_times = []
    last = [time.perf_counter()]

    def on_step(*_a, **_k):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return _k.get("callback_kwargs", {}) if "callback_kwargs" in _k else (_a[-1] if _a and isinstance(_a[-1], dict) else {})

    if par:
        par.stats.reset()
    t0 = time.perf_counter()
    with torch.no_grad():
        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            kw["callback_on_step_end"] = on_step
        out = pipe(args.prompt, num_inference_steps=args.steps, generator=gen, **kw)
    total = time.perf_counter() - t0
    report = dict(model=args.model, plan=str(args.plan), parallel=args.parallel, world_size=par.world_size if par else 1,
                  steps=args.steps, total_s=total, step_s=step_times or [total / args.steps],
                  bytes_per_step=(par.stats.total / args.steps) if par else 0, device=str(dev))
    if rank == 0:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _save(out.frames, out_path)
        if args.save_tensor:
            torch.save(out.frames, args.save_tensor)
        out_path.with_suffix(".json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out_path}: {total:.2f} s total, {report['bytes_per_step'] / 2**20:.2f} MiB sent per step by rank 0")
    if par:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
