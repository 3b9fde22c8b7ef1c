"""Outputs of a run besides weights: loss curves (CSV is written by the trainer, PNG here) and the scorecard."""
from __future__ import annotations

import csv
import json
import logging
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


def final_scorecard(run_dir, adapter, device) -> dict | None:
    """Scorecard of the result against the dense many-step teacher (EVAL's ``vdit_compile.eval.scorecard``).

    Rows: teacher dense at ``eval_teacher_steps``; the result at every ``sample_steps`` count.  Written to
    ``RUN/scorecard.json`` and ``RUN/scorecard.md``.
    """
    from .config import DistillConfig
    from .pipeline import load_run

    run_dir = Path(run_dir)
    cfg = DistillConfig.load(run_dir / "config.json")
    try:
        from vdit_compile.eval import scorecard
    except ImportError as exc:
        log.warning("scorecard skipped: vdit_compile.eval.scorecard is not importable (%s)", exc)
        return None
    if adapter.pipe is None:
        log.warning("scorecard skipped: model %r has no pipeline to serve as the teacher", cfg.model)
        return None
    pipe = load_run(run_dir, device=device)
    prompts = adapter.sample_prompts(cfg.eval_prompts, cfg.seed + 12345)
    seeds = list(range(len(prompts)))
    rows = {}
    for steps in cfg.steps_list():
        rows[f"result {steps} steps"] = scorecard(pipe, prompts, seeds, steps, reference=adapter.pipe)
    out = {"rows": rows, "teacher_steps": cfg.eval_teacher_steps}
    (run_dir / "scorecard.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out
