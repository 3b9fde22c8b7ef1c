"""Wall time of calibrating a shipped reference world end to end on this device, per token-tile size.

    python benchmarks/calibration_world.py [--world textured] [--tile-tokens 64 16] [--steps 10] [--json out.jsonl]

``api.collect_calibration`` on the world's pipeline: the capture run of the calibration prompt(s) and the
statistics of every site (on CPU the exact pass: every candidate's output error), as the demo calibrates
(``vdit-compile demo`` uses 1 prompt x 10 steps, the prompts at offset 500).  Prints, per tile size, the time, the
candidate count and the plan at the default budget, so a change to the collector can be checked to keep the same
plans while it changes the time (run it before and after in one session: CPU timings move between sessions).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from tqdm.auto import tqdm

import vdit_compile as vc
from vdit_compile.calibration.run import CalibrationSettings, build_plan
from vdit_compile.eval.demo import CALIB_OFFSET
from vdit_compile.eval.prompts import prompt_set
from vdit_compile.models.worlds import world_package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="textured")
    ap.add_argument("--tile-tokens", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="append one JSON row per tile size")
    args = ap.parse_args()
    pipe = world_package(args.world).load_pipeline(device=args.device)
    calib = prompt_set(args.prompts, CALIB_OFFSET, world=args.world).prompts
    for tt in tqdm(args.tile_tokens, desc="tile sizes"):
        t0 = time.perf_counter()
        cals, sites = vc.api.collect_calibration(pipe, calib_prompts=calib, calib_steps=args.steps, progress=False,
                                                 tile_tokens=tt)
        seconds = time.perf_counter() - t0
        plan = build_plan(pipe.transformer, cals, CalibrationSettings(tile_tokens=tt), sites)
        row = {"world": args.world, "tile_tokens": tt, "prompts": args.prompts, "steps": args.steps,
               "seconds": round(seconds, 2), "candidates": {n: len(c.candidates) for n, c in cals.items()},
               "plan": {s.name: [m.name for m in s.masks] for s in plan.tiled_sites()},
               "device": args.device, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        tqdm.write(json.dumps(row))
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
