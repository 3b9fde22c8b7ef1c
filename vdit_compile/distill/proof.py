"""The GPU proof on the embedded model in one bounded call: distil to several segment counts, score, pack.

    python3 -m vdit_compile.distill.proof --out $OUT --segments 4,8 --minutes 9 -- --mlcd-steps 1500 ...

Runs one ``tools/distill.py`` process per segment count side by side on the GPU (the embedded model is
far too small to fill an H100 alone), stops them with SIGTERM (they checkpoint) if training outlives
its share of the time, then scores every finished stage *sequentially* (so wall times are not
disturbed by the other run) with :func:`vdit_compile.distill.report.score_runs`, and packs each run
into ``OUT/s<S>.tgz`` (everything but checkpoints and the MLCD weights) plus ``OUT/s<S>-mlcd.safetensors``
so a later call can continue from the finished MLCD stage: carry those files in a git-ignored folder and
pass ``--restore FOLDER``.

``--variant NAME=OPTIONS`` (repeatable) trains several recipes side by side for each segment count: run
``s<S>-NAME`` gets the common options after ``--`` followed by ``OPTIONS`` (later options win in argparse).
Each finished MLCD stage is checked with the per-segment diagnostic (:mod:`.segments`, written to
``RUN/mlcd/segments.json`` and so packed), which is how the next call picks the recipe worth scoring.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pack(run: Path, out: Path) -> None:
    with tarfile.open(out / f"{run.name}.tgz", "w:gz") as tar:
        for f in sorted(run.rglob("*")):
            rel = f.relative_to(run)
            if f.is_file() and rel.parts[0] != "checkpoints" and rel != Path("mlcd/weights.safetensors"):
                tar.add(f, arcname=f"{run.name}/{rel}")
    w = run / "mlcd" / "weights.safetensors"
    if w.is_file():
        shutil.copy2(w, out / f"{run.name}-mlcd.safetensors")


def _restore(src: Path, work: Path, names) -> None:
    """Inverse of :func:`_pack`: a previous call's runs, minus checkpoints, ready for ``--resume``."""
    for name in names:
        tgz = src / f"{name}.tgz"
        if not tgz.is_file():
            continue
        with tarfile.open(tgz) as tar:
            tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
        w = src / f"{name}-mlcd.safetensors"
        if w.is_file():
            (work / name / "mlcd").mkdir(parents=True, exist_ok=True)
            shutil.copy2(w, work / name / "mlcd" / "weights.safetensors")
        print(f"restored {name} from {src}", flush=True)


def parse_variants(specs) -> dict[str, list[str]]:
    """``["a=--lr 1e-4 --ema-decay 0.995", "b="]`` -> ``{"a": [...], "b": []}``, with clear errors."""
    out = {}
    for spec in specs or ():
        name, sep, opts = spec.partition("=")
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"--variant expects NAME=OPTIONS with NAME made of letters, digits, - and _, found {spec!r}")
        if name in out:
            raise SystemExit(f"--variant {name} given twice")
        out[name] = shlex.split(opts)
    return out


def run_names(segments, variants: dict) -> dict[str, tuple[int, list[str]]]:
    """Run directory name -> (segment count, the variant's extra options)."""
    if not variants:
        return {f"s{S}": (S, []) for S in segments}
    return {f"s{S}-{name}": (S, opts) for S in segments for name, opts in variants.items()}


def _segment_check(run: Path, S: int, device: str, prompts: int = 16) -> None:
    """The per-segment diagnostic of a finished MLCD stage, into ``RUN/mlcd/segments.json`` (printed too)."""
    from .loading import load_adapter
    from .schedule import FewStepSchedule
    from .segments import format_rows, load_student, segment_errors

    cfg = json.loads((run / "config.json").read_text())
    adapter = load_adapter(cfg["model"], device=device)
    schedule = FewStepSchedule.from_adapter(adapter, cfg["teacher_steps"], S)
    rows = segment_errors(adapter, load_student(adapter, run), schedule, adapter.sample_prompts(prompts, 4242), 0,
                          guidance=cfg.get("guidance_scale"), device=device, student_cfg=bool(cfg.get("student_cfg", False)))
    (run / "mlcd" / "segments.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{run.name} per-segment jump error:\n{format_rows(rows)}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/distill-proof")
    p.add_argument("--segments", default="4,8")
    p.add_argument("--minutes", type=float, default=9.0, help="whole budget; training gets what scoring leaves")
    p.add_argument("--score-minutes", type=float, default=2.5)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--no-score", action="store_true", help="train and pack only (a later --restore call scores): gives "
                                                              "training the whole call")
    p.add_argument("--resume", action="store_true", help="continue runs already in --work")
    p.add_argument("--restore", help="a folder holding a previous call's s<S>.tgz and s<S>-mlcd.safetensors: unpack "
                                     "them into --work and continue those runs (implies --resume)")
    p.add_argument("--variant", action="append", metavar="NAME=OPTIONS",
                   help="train this recipe too, as run s<S>-NAME (repeatable; OPTIONS are tools/distill.py options)")
    p.add_argument("--no-segment-check", action="store_true", help="skip the per-segment diagnostic of finished MLCD runs")
    p.add_argument("--check-minutes", type=float, default=0.4, help="time kept back for the per-segment diagnostic")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then options for tools/distill.py")
    a = p.parse_args(argv)
    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    extra = [x for x in a.rest if x != "--"]
    names = run_names([int(s) for s in a.segments.split(",")], parse_variants(a.variant))
    if a.restore:
        _restore(Path(a.restore), work, names)
        a.resume = True
    procs = {}
    for name, (S, opts) in names.items():
        run = work / name
        if a.resume and (run / "config.json").is_file():
            cmd = [sys.executable, str(ROOT / "tools" / "distill.py"), "--resume", str(run)]
        else:
            cmd = [sys.executable, str(ROOT / "tools" / "distill.py"), "--model", "embedded", "--segments", str(S),
                   "--out", str(run), "--no-eval", "--overwrite", *extra, *opts]
        log = open(work / f"{name}.log", "w")
        print("$", " ".join(cmd), flush=True)
        procs[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
    reserve = (0.0 if a.no_score else a.score_minutes) + (0.0 if a.no_segment_check else a.check_minutes)
    deadline = t0 + 60 * (a.minutes - reserve)
    while any(pr.poll() is None for pr, _ in procs.values()):
        if time.time() > deadline:
            print("training deadline reached: SIGTERM (runs checkpoint and stop)", flush=True)
            for pr, _ in procs.values():
                if pr.poll() is None:
                    pr.send_signal(signal.SIGTERM)
            for pr, _ in procs.values():
                try:
                    pr.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pr.kill()
            break
        time.sleep(2)
    for run, (pr, log) in procs.items():
        log.close()
        print(f"{run.name}: exit {pr.returncode} after {time.time() - t0:.0f}s", flush=True)
        print("".join((work / f"{run.name}.log").read_text().splitlines(keepends=True)[-8:]), flush=True)
    finished = [r for r in procs if (r / "mlcd" / "done.json").is_file()]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for run in finished:
        if a.no_segment_check or (run / "mlcd" / "segments.json").is_file():
            continue
        try:
            _segment_check(run, names[run.name][0], device)
        except Exception as exc:  # a diagnostic must not cost the packed runs
            print(f"{run.name}: segment check failed: {exc!r}", flush=True)
    if finished and not a.no_score:
        from .report import score_runs

        try:
            score_runs(finished, device=device, prompts=a.prompts, out=work / "score")
            print((work / "score" / "scorecard.md").read_text(), flush=True)
        except Exception as exc:  # report what was trained even if scoring fails
            import traceback

            traceback.print_exc()
            print(f"scoring failed: {exc}", flush=True)
    for run in procs:
        if run.exists():
            _pack(run, out)
    if (work / "score").is_dir():
        with tarfile.open(out / "score.tgz", "w:gz") as tar:
            tar.add(work / "score", arcname="score")
            for run in procs:
                tar.add(work / f"{run.name}.log", arcname=f"score/{run.name}.log")
    print(f"proof done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
