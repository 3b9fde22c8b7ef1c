"""The GPU proof on the embedded model in one bounded call: distil to several segment counts, score, pack.

    python3 -m vdit_compile.distill.proof --out $OUT --segments 4,8 --minutes 9 -- --mlcd-steps 1500 ...

Runs one ``tools/distill.py`` process per segment count side by side on the GPU (the embedded model is
far too small to fill an H100 alone), stops them with SIGTERM (they checkpoint) if training outlives
its share of the time, then scores every finished stage *sequentially* (so wall times are not
disturbed by the other run) with :func:`vdit_compile.distill.report.score_runs`, and packs each run
into ``OUT/s<S>.tgz`` (everything but checkpoints and the MLCD weights) plus ``OUT/s<S>-mlcd.safetensors``
so a later call can continue from the finished MLCD stage: carry those files in a git-ignored folder and
pass ``--restore FOLDER``.
"""
from __future__ import annotations

import argparse
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


def _restore(src: Path, work: Path, segments) -> None:
    """Inverse of :func:`_pack`: a previous call's runs, minus checkpoints, ready for ``--resume``."""
    for S in segments:
        tgz = src / f"s{S}.tgz"
        if not tgz.is_file():
            continue
        with tarfile.open(tgz) as tar:
            tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
        w = src / f"s{S}-mlcd.safetensors"
        if w.is_file():
            (work / f"s{S}" / "mlcd").mkdir(parents=True, exist_ok=True)
            shutil.copy2(w, work / f"s{S}" / "mlcd" / "weights.safetensors")
        print(f"restored s{S} from {src}", flush=True)


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
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then options for tools/distill.py")
    a = p.parse_args(argv)
    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    extra = [x for x in a.rest if x != "--"]
    if a.restore:
        _restore(Path(a.restore), work, [int(s) for s in a.segments.split(",")])
        a.resume = True
    procs = {}
    for S in [int(s) for s in a.segments.split(",")]:
        run = work / f"s{S}"
        if a.resume and (run / "config.json").is_file():
            cmd = [sys.executable, str(ROOT / "tools" / "distill.py"), "--resume", str(run)]
        else:
            cmd = [sys.executable, str(ROOT / "tools" / "distill.py"), "--model", "embedded", "--segments", str(S),
                   "--out", str(run), "--no-eval", "--overwrite", *extra]
        log = open(work / f"s{S}.log", "w")
        print("$", " ".join(cmd), flush=True)
        procs[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
    deadline = t0 + 60 * (a.minutes - (0.0 if a.no_score else a.score_minutes))
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
    if finished and not a.no_score:
        from .report import score_runs

        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
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
