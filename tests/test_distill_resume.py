"""Checkpoint -> kill (real SIGTERM, then real SIGKILL, to a subprocess) -> resume == uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny", "--stages", "mlcd", "--teacher-steps", "8", "--segments", "2", "--pool-size", "8",
        "--batch-size", "4", "--mlcd-steps", "40", "--lr", "1e-3", "--warmup-steps", "5", "--ckpt-every", "5",
        "--log-every", "1", "--no-eval", "--device", "cpu", "--precision", "fp32",
        "--lr-decay", "cosine"]  # a step-dependent learning rate must resume bit for bit too


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


def _cmd(*extra):
    return [sys.executable, str(ROOT / "tools" / "distill.py"), *extra]


def _latest_step(run_dir: Path) -> int:
    ptr = run_dir / "checkpoints" / "latest.json"
    try:
        return json.loads(ptr.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _start_and_kill(cmd, run_dir: Path, sig, after_step: int, timeout=120.0):
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while _latest_step(run_dir) < after_step:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=timeout)
    return proc


def _weights(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"]
    out = {}
    for name in ("model", "ema", "target"):
        out.update({f"{name}.{k}": v for k, v in load_file(str(ck / f"{name}.safetensors")).items()})
    out.update({f"final.{k}": v for k, v in load_file(str(run_dir / "mlcd" / "weights.safetensors")).items()})
    return out


@pytest.mark.timeout(300)
def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cmd(*ARGS, "--out", str(ref)), env=_env(), check=True, capture_output=True)

    # 1. SIGTERM: the run finishes its step, writes a checkpoint and exits with 128 + SIGTERM.
    p = _start_and_kill(_cmd(*ARGS, "--out", str(cut)), cut, signal.SIGTERM, after_step=5)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr.read().decode()[-2000:]
    stopped = _latest_step(cut)
    assert 5 <= stopped < 40 and not (cut / "mlcd" / "done.json").exists()

    # 2. resume, then SIGKILL (no chance to save): the steps since the last checkpoint are lost, nothing else.
    p = _start_and_kill(_cmd("--resume", str(cut)), cut, signal.SIGKILL, after_step=stopped + 5)
    assert p.returncode == -signal.SIGKILL
    assert _latest_step(cut) >= stopped + 5

    # 3. resume to the end: bit-for-bit the uninterrupted run.
    subprocess.run(_cmd("--resume", str(cut)), env=_env(), check=True, capture_output=True)
    a, b = _weights(ref), _weights(cut)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert _losses(cut) == _losses(ref)


def _losses(run_dir):
    import csv

    with open(run_dir / "mlcd" / "loss.csv") as fh:
        return [(r["step"], r["loss"], r["consistency"], r["anchor"]) for r in csv.DictReader(fh)]
