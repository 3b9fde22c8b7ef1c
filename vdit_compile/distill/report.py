"""Outputs of a run besides weights: loss curves (CSV is written by the trainer, PNG here) and the scorecard."""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def read_loss_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def plot_losses(run_dir) -> Path | None:
    """``RUN/loss_curves.png``: one panel per trained stage (loss and its parts against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    stages = [(s, run_dir / s / "loss.csv") for s in ("mlcd", "kd") if (run_dir / s / "loss.csv").is_file()]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for ax, (stage, path) in zip(axes[0], stages):
        rows = read_loss_csv(path)
        steps = [r["step"] for r in rows]
        for key in ("loss", "consistency", "anchor", "rel_err"):
            if key in rows[0]:
                ax.plot(steps, [r[key] for r in rows], label=key)
        if all(r["loss"] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{stage} loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


STAGE_LABELS = {"mlcd": "MLCD dense", "masks": "MLCD + masks (before KD)", "kd": "final (MLCD + masks + KD)"}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def latency(pipe, steps: int, prompt: str, repeats: int = 5, **kw) -> float:
    """Median seconds for one video (batch 1) after one warm-up call."""
    import statistics

    import torch

    times = []
    for i in range(repeats + 1):
        g = torch.Generator("cpu").manual_seed(i)
        _sync(getattr(pipe, "device", "cpu"))
        t0 = time.perf_counter()
        pipe([prompt], num_inference_steps=steps, generator=[g], progress=False, **kw)
        _sync(getattr(pipe, "device", "cpu"))
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def score_runs(run_dirs, device="cpu", prompts: int | None = None, out: Path | None = None, progress: bool = True,
               backend: str = "eager") -> dict:
    """Scorecards: dense teacher at ``eval_teacher_steps`` (the reference), plain teacher Euler at the few-step
    counts, and every finished stage of every run at its step counts; plus batch-1 latency of the teacher and
    of each run's final model.  Writes ``scorecard.json`` / ``scorecard.md`` into ``out`` when given.
    ``backend="eager"``: the rewritten graphs run uncompiled, like the (uncompiled) teacher pipeline, so the
    timings compare like for like and no inductor compile is paid per model."""
    from vdit_compile.eval.scorecard import render_table, scorecard, to_json

    from .config import DistillConfig
    from .loading import load_adapter
    from .pipeline import load_run

    run_dirs = [Path(r) for r in run_dirs]
    cfg0 = DistillConfig.load(run_dirs[0] / "config.json")
    n = prompts or cfg0.eval_prompts
    bs = cfg0.eval_batch_size
    teacher = load_adapter(cfg0.model, device=device).pipe
    if teacher is None:
        raise ValueError(f"model {cfg0.model!r} has no pipeline to act as the dense teacher")
    t_steps = cfg0.eval_teacher_steps
    card, clips, _ = scorecard(teacher, n, steps=t_steps, batch_size=bs, name="teacher dense", progress=progress,
                               return_clips=True)
    cards = [card]
    lat = {f"teacher dense {t_steps}": latency(teacher, t_steps, "a small red circle moving left over a black background")}
    steps_all = sorted({s for r in run_dirs for s in DistillConfig.load(r / "config.json").steps_list()})
    for steps in steps_all:
        cards.append(scorecard(teacher, n, steps=steps, reference=clips, batch_size=bs, name="teacher Euler (plain)",
                               progress=progress))
    for r in run_dirs:
        cfg = DistillConfig.load(r / "config.json")
        # runs named other than s<S> (proof variants: s8-d1, s8-d2) carry their name into the rows
        tag = "" if r.name == f"s{cfg.segments}" else f" ({r.name})"
        for stage in ("mlcd", "masks", "kd"):
            if stage not in cfg.stage_list() or not (r / stage / "done.json").is_file():
                continue
            pipe = load_run(r, device=device, stage=stage, backend=backend)
            for steps in cfg.steps_list():
                c = scorecard(pipe, n, steps=steps, reference=clips, batch_size=bs,
                              name=f"S={cfg.segments}{tag} {STAGE_LABELS[stage]}", progress=progress,
                              settings={"run": r.name, "stage": stage, "segments": cfg.segments})
                cards.append(c)
            if stage == cfg.stage_list()[-1]:
                for steps in cfg.steps_list():
                    lat[f"S={cfg.segments}{tag} {STAGE_LABELS[stage]} {steps}"] = latency(pipe, steps, "a small red circle moving left over a black background")
            del pipe
    result = {"cards": cards, "latency_batch1_seconds": lat}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        to_json(result, out / "scorecard.json")
        base = lat[f"teacher dense {t_steps}"]
        lines = [render_table(cards), "", "| sampler (batch 1) | seconds / video | speed-up vs teacher |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {base / v:.1f}x |" for k, v in lat.items()]
        (out / "scorecard.md").write_text("\n".join(lines) + "\n")
    return result


def final_scorecard(run_dir, adapter, device) -> dict | None:
    """The scorecard at the end of a run (``RUN/scorecard.json`` and ``.md``); skipped with a warning when the
    model has no pipeline (the tiny test model)."""
    if adapter.pipe is None:
        log.warning("scorecard skipped: model %r has no pipeline to serve as the teacher", adapter.name)
        return None
    return score_runs([run_dir], device=device, out=run_dir)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Scorecards of finished distillation runs against the dense teacher.")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=None)
    a = p.parse_args(argv)
    score_runs(a.runs, device=a.device, prompts=a.prompts, out=Path(a.out))
    print((Path(a.out) / "scorecard.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
