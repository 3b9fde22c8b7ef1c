#!/usr/bin/env python3
"""Batch-1 latency of the distilled few-step samplers against the 50-step teacher, several ways, one run.

Why: the issue-6 target is end-to-end sampling >= 10x faster than the 50-step dense teacher. On the tiny
embedded model every step is launch/overhead bound, so *how* the student runs (eager graph, inductor,
dense or tile-sparse attention) decides the figure; this script measures each way side by side and
profiles one sparse call so the per-step overhead is visible, not guessed.

    python benchmarks/fewstep_latency.py --runs /tmp/runs/s4 /tmp/runs/s8 --out $OUT [--profile]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a small red circle moving left over a black background"


def median_latency(pipe, steps: int, repeats: int) -> float:
    from vdit_compile.distill.report import latency

    return latency(pipe, steps, PROMPT, repeats=repeats)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="distillation run directories (tools/distill.py --out)")
    p.add_argument("--out", default="runs/fewstep_latency")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one sparse call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32-precision", nargs="+", default=["highest"], choices=["highest", "high"],
                   help="torch.set_float32_matmul_precision for teacher and students alike ('high': TF32 matmuls "
                        "and TF32 dots in the tile kernel); each value is one full pass")
    a = p.parse_args(argv)
    from vdit_compile.distill.config import DistillConfig
    from vdit_compile.distill.loading import load_adapter

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(name, steps, seconds, **extra):
        rows.append({"way": name, "steps": steps, "seconds": seconds, **extra})
        print(f"{name:55s} {steps:3d} steps  x{extra.get('speedup', 1.0):5.2f}  {seconds * 1e3:9.2f} ms/video  {seconds / steps * 1e3:7.2f} ms/step",
              flush=True)

    cfg0 = DistillConfig.load(Path(a.runs[0]) / "config.json")
    teacher = load_adapter(cfg0.model, device=a.device).pipe
    for prec in a.fp32_precision:
        torch.set_float32_matmul_precision(prec)
        print(f"--- fp32 matmul precision {prec!r}", flush=True)
        base = median_latency(teacher, a.teacher_steps, a.repeats)
        record("teacher dense (CFG, eager)", a.teacher_steps, base, fp32_precision=prec)
        students(a, base, prec, record, rows, out, profile_segments=cfg0.segments)
    meta = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    (out / "fewstep_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


def students(a, base, prec, record, rows, out, profile_segments):
    """Every way of running every run's student, timed against ``base`` (the teacher, same precision)."""
    from vdit_compile.distill.config import DistillConfig
    from vdit_compile.distill.pipeline import load_run

    for r in a.runs:
        cfg = DistillConfig.load(Path(r) / "config.json")
        S = cfg.segments
        ways = [("mlcd", False, "eager", "MLCD dense, eager module"),
                ("kd", False, "eager", "final weights, dense attention (no plan)"),
                ("kd", True, "eager", "final, tile-sparse, vdit graph eager"),
                ("kd", True, "auto", "final, tile-sparse, vdit graph + inductor")]
        for stage, sparse, backend, label in ways:
            torch._dynamo.reset()
            g0 = dynamo_graphs()
            try:
                pipe = load_run(r, device=a.device, stage=stage, sparse=sparse, backend=backend)
                t0 = time.perf_counter()
                median_latency(pipe, S, 1)  # warm-up incl. compile
                warm = time.perf_counter() - t0
                sec = median_latency(pipe, S, a.repeats)
            except Exception as exc:  # report and go on: one failing way must not hide the others
                print(f"S={S} {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                rows.append({"way": f"S={S} {label}", "error": f"{type(exc).__name__}: {exc}"})
                continue
            record(f"S={S} {label}", S, sec, speedup=base / sec, warmup_s=warm, graphs=dynamo_graphs() - g0,
                   fp32_precision=prec)
            if a.profile and sparse and backend == "eager" and S == profile_segments and prec == a.fp32_precision[0]:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
                with profile(activities=acts) as prof:
                    median_latency(pipe, S, 2)
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
                (out / f"profile_s{S}.txt").write_text(table)
                print(table[:6000], flush=True)
            del pipe


if __name__ == "__main__":
    raise SystemExit(main())
