"""What an error budget costs end to end: density of the calibrated plan vs how far videos move.

    python benchmarks/calibration_budget.py [--model embedded] [--budgets 0.02,0.05,0.1,0.2]

For each budget: calibrate on the calibration prompts, apply the plan, generate the evaluation
prompts with fixed seeds, and compare with the dense model's videos (PSNR in dB and relative L2
of the frames).  The dense videos are generated once.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import vdit_compile
from vdit_compile.api import calibrate_model
from vdit_compile.calibration import CalibrationSettings, capture_transformer_inputs
from vdit_compile.models.spec import load_model

CALIB = ["a red circle moving left", "a large blue square bouncing", "a small yellow triangle rotating",
         "a green diamond moving diagonally"]
EVAL = ["a cyan cross growing", "a magenta circle moving right slowly", "a dark gray square shrinking"]


def generate(pipe, steps: int, prompts, seed: int = 0) -> torch.Tensor:
    outs = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        outs.append(pipe(p, num_inference_steps=steps, generator=g, progress=False).frames.float().cpu())
    return torch.cat(outs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--budgets", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--calib-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-calib", type=int, default=len(CALIB), help="calibration prompts used")
    ap.add_argument("--num-eval", type=int, default=len(EVAL), help="evaluation prompts used")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = load_model(args.model).to(args.device)
    t = time.perf_counter()
    calib, evals = CALIB[: args.num_calib], EVAL[: args.num_eval]
    dense = generate(pipe, args.steps, evals)
    dense_s = time.perf_counter() - t
    inputs = capture_transformer_inputs(pipe, calib, num_inference_steps=args.calib_steps, device=None)
    rows = []
    for b in (float(x) for x in args.budgets.split(",")):
        plan = calibrate_model(pipe, inputs, CalibrationSettings(error_budget=b, num_prompts=len(calib),
                                                                 num_inference_steps=args.calib_steps))
        tiled = plan.tiled_sites()
        heads = [d for s in plan.sites if s.kind in ("video_self", "joint_text_prefix", "joint_text_suffix")
                 for d in (s.densities or [1.0] * s.num_heads)]
        vdit_compile.optimize(pipe, plan=plan, progress=False)
        sparse = generate(pipe, args.steps, evals)
        vdit_compile.restore(pipe)
        rows.append({"budget": b, "tiled_sites": len(tiled), "sites": len(plan.sites),
                     "mean_head_density": round(sum(heads) / len(heads), 4),
                     "psnr_db_vs_dense": round(psnr(sparse, dense), 2),
                     "rel_l2_vs_dense": round(float((sparse - dense).norm() / dense.norm()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"model {args.model} on {args.device}; {len(calib)} calibration prompts x {args.calib_steps} steps; "
          f"{len(evals)} evaluation videos x {args.steps} steps (dense: {dense_s:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
