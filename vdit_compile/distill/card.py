"""Model-card tables from measured results only: ``scorecard.json`` of :func:`report.score_runs` + run timings.

    python -m vdit_compile.distill.card SCORE_DIR RUN_DIR... > table.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ATTRS = ("shape", "colour", "motion")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, d=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{d}f}"


def quality_table(score: dict) -> str:
    cards = score["cards"]
    teacher = cards[0]
    tacc = teacher.get("accuracy", {})
    head = "| sampler | steps | " + " | ".join(ATTRS) + " | min % of teacher | temp. cons. | PSNR dB | SSIM | s/video (batched) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cards:
        acc = c.get("accuracy", {})
        rel = [acc[a] / tacc[a] for a in ATTRS if a in acc and tacc.get(a)]
        lines.append(
            f"| {c.get('name')} | {c.get('settings', {}).get('steps')} | "
            + " | ".join(_pct(acc.get(a)) for a in ATTRS)
            + f" | {_pct(min(rel)) if rel else '-'} | {_num(c.get('temporal_consistency'))} | {_num(c.get('psnr'), 2)}"
            f" | {_num(c.get('ssim'))} | {_num(c.get('seconds_per_video'), 4)} |"
        )
    return "\n".join(lines)


def latency_table(score: dict) -> str:
    lat = score["latency_batch1_seconds"]
    base_key = next(k for k in lat if k.startswith("teacher"))
    base = lat[base_key]
    lines = ["| sampler (batch 1, median of 5) | seconds / video | speed-up vs dense 50-step teacher |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {base / v:.1f}x |" for k, v in lat.items()]
    return "\n".join(lines)


def timing_table(run_dirs) -> str:
    lines = ["| run | pool (teacher trajectories) | MLCD train | masks (calibration) | KD train | mean density |", "|---|---|---|---|---|---|"]
    for r in map(Path, run_dirs):
        t = json.loads((r / "timings.json").read_text()) if (r / "timings.json").is_file() else {}
        pool = t.get("pool", {})
        m, k, mk = t.get("mlcd", {}), t.get("kd", {}), t.get("masks", {})
        lines.append(
            f"| {r.name} | {_num(pool.get('seconds'), 1)} s ({pool.get('trajectories', '-')}) | "
            f"{_num(m.get('train_seconds'), 1)} s / {m.get('steps', '-')} steps | {_num(mk.get('stage_seconds'), 1)} s | "
            f"{_num(k.get('train_seconds'), 1)} s / {k.get('steps', '-')} steps | {_num(mk.get('mean_density'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    score = json.loads((Path(argv[0]) / "scorecard.json").read_text())
    print(quality_table(score), "\n", latency_table(score), "\n", timing_table(argv[1:]), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
