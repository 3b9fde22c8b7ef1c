"""Which linears' FP8 rounding moves the embedded transformer's output most.

FP8 emulated (``fp8="emulate"``: per-row e4m3 activations and weights, fp32 accumulation) on one group of linears
at a time, and on every group but one; the figure is the relative L2 error of the transformer's output against the
un-quantised one, mean over the sampler calls recorded from ``--prompts`` prompts x ``--steps`` steps.  Per-call
error is a proxy: the scorecard (benchmarks/wholestep_quality.py) says what a sampled clip loses.

    python benchmarks/fp8_sensitivity.py --out out          # CPU, ~2 min
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = {"attn1.qk": ["*attn1.to_q", "*attn1.to_k"], "attn1.v": ["*attn1.to_v"], "attn1.out": ["*attn1.to_out.0"],
          "attn2.q": ["*attn2.to_q"], "attn2.out": ["*attn2.to_out.0"],
          "ffn.up": ["*ffn.net.0.proj"], "ffn.down": ["*ffn.net.2"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)

    import vdit_compile as vc
    from vdit_compile.calibration.inputs import capture_transformer_inputs
    from vdit_compile.eval.prompts import prompt_set
    from vdit_compile.models.embedded import load_pipeline
    from vdit_compile.wholestep.fp8 import CONDITION_PATTERNS

    torch.manual_seed(0)
    pipe = load_pipeline(device=args.device, dtype=torch.float32)
    tr = pipe.transformer
    calls = capture_transformer_inputs(pipe, prompt_set(args.prompts).prompts, num_inference_steps=args.steps,
                                       max_calls=args.prompts * args.steps * 2, device=None, progress=False)

    def outputs():
        outs = []
        with torch.no_grad():
            for kw in calls:  # capture_transformer_inputs records each call's keyword arguments
                o = tr(**kw)
                outs.append((o[0] if isinstance(o, tuple) else o.sample).float())
        return outs

    ref = outputs()

    def error_keeping(keep) -> float:
        # fp8_max_error=1: no linear is kept by the error check, so each group's own rounding is what is measured
        vc.optimize(tr, plan=vc.TileMask(dense=True), progress=False, backend="eager", fp8="emulate",
                    fp8_keep=keep, fp8_max_error=1.0)
        try:
            return sum(((o - r).norm() / r.norm()).item() for o, r in zip(outputs(), ref)) / len(ref)
        finally:
            vc.restore(tr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, device=args.device,
                 calls=len(calls), argv=sys.argv, note=f"condition-token linears {list(CONDITION_PATTERNS)} stay "
                 "high precision by the library's rule in every row")]
    every = [p for g in GROUPS.values() for p in g]
    rows.append(dict(group="all", error=error_keeping([])))
    for g, pats in GROUPS.items():
        rows.append(dict(group=g, only_this_group_fp8=error_keeping([p for p in every if p not in pats]),
                         all_but_this_group_fp8=error_keeping(pats)))
    with open(out / "fp8_sensitivity.jsonl", "a") as fh:
        for r in rows:
            print(json.dumps(r), flush=True)
            fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
