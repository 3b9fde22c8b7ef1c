"""Per-segment jump error: where a few-step student beats (or loses to) the teacher's plain Euler step.

The scorecard compares whole samples, in which the errors of every step pile up; this diagnostic isolates
one step.  From the teacher's own trajectory point at the start of each segment (exact: no earlier error),
it measures the RMS distance to the teacher's point at the segment's end of

* one plain Euler step of the teacher (with CFG) -- what the naive S-step sampler does there, and
* one jump of the student (guidance baked in, or applied by the student for ``--student-cfg`` runs) --
  what the distilled sampler does there.

A student beats plain Euler overall only if it beats it on the segments that dominate the sample's error;
the table says which segments those are and where training made things worse than the teacher it started
from (run C: the student won the first and last segments by 4x and 1.7x and lost the five middle ones by up to
2.2x, docs/distill/README.md).

    python -m vdit_compile.distill.segments RUN_DIR_OR_WEIGHTS --segments 8 --prompts 8
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from .pool import noise_for
from .schedule import FewStepSchedule, cfg_velocity, student_velocity, teacher_trajectory


def _rms(a: torch.Tensor) -> float:
    return float(a.float().pow(2).flatten(1).mean(1).sqrt().mean())


@torch.no_grad()
def segment_errors(adapter, student: torch.nn.Module, schedule: FewStepSchedule, prompts: list[str], seed: int = 0,
                   guidance: float | None = None, device="cpu", student_cfg: bool = False) -> list[dict]:
    """One row per segment: sigmas, the plain-Euler and the student's RMS jump error, and their ratio.
    ``student_cfg``: the student guides itself at ``guidance`` (a ``--student-cfg`` run)."""
    guidance = adapter.default_guidance if guidance is None else float(guidance)
    P = len(prompts)
    cond = adapter.encode(prompts, device)
    uncond = adapter.negative(P, device)
    noise = noise_for(seed, P, adapter.latent_shape(), device)
    traj = teacher_trajectory(adapter, adapter.transformer, noise, cond, uncond, guidance,
                              schedule.timesteps, schedule.sigmas)
    t, s = schedule.timesteps, schedule.sigmas
    rows = []
    for k, b in enumerate(schedule.boundaries()[:-1]):
        e = b + schedule.seg_len
        x, x_end, span = traj[:, b], traj[:, e], s[e] - s[b]
        v_euler = cfg_velocity(adapter, adapter.transformer, x, t[b], cond, uncond, guidance)
        v_student = student_velocity(adapter, student, x, torch.full((P,), float(t[b]), device=x.device), cond,
                                     guidance if student_cfg else None, uncond)
        euler, stud = _rms(x + span * v_euler - x_end), _rms(x + span * v_student - x_end)
        rows.append({"segment": k, "sigma_from": s[b], "sigma_to": s[e], "euler_rms": euler, "student_rms": stud,
                     "student_over_euler": stud / max(euler, 1e-12)})
    return rows


def format_rows(rows: list[dict]) -> str:
    out = ["| segment | sigma | plain Euler RMS | student RMS | student / Euler |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['segment']} | {r['sigma_from']:.3f} -> {r['sigma_to']:.3f} | {r['euler_rms']:.4f} | "
                   f"{r['student_rms']:.4f} | {r['student_over_euler']:.2f} |")
    return "\n".join(out)


def load_student(adapter, path: Path) -> torch.nn.Module:
    """A run directory (its dense MLCD weights) or a ``.safetensors`` file of the transformer."""
    from .stages import load_weights

    if path.is_dir():
        path = path / "mlcd" / "weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a run directory with mlcd/weights.safetensors or a .safetensors file")
    return load_weights(copy.deepcopy(adapter.transformer), path).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", help="a distillation run directory or a transformer .safetensors file")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--teacher-steps", type=int, default=48)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--student-cfg", action=argparse.BooleanOptionalAction, default=None,
                    help="the student guides itself (default: what the run's config.json says; baked in for a bare file)")
    a = ap.parse_args(argv)
    from .loading import load_adapter

    adapter = load_adapter(a.model, device=a.device)
    schedule = FewStepSchedule.from_adapter(adapter, a.teacher_steps, a.segments)
    student = load_student(adapter, Path(a.weights))
    run_cfg = Path(a.weights) / "config.json"
    student_cfg = run_cfg.is_file() and bool(json.loads(run_cfg.read_text()).get("student_cfg", False))
    if a.student_cfg is not None:
        student_cfg = a.student_cfg
    rows = segment_errors(adapter, student, schedule, adapter.sample_prompts(a.prompts, 4242), a.seed, device=a.device,
                          student_cfg=student_cfg)
    print(format_rows(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
