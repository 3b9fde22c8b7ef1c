"""A calibration killed with SIGKILL resumes from its checkpoint and gives the plan of an uninterrupted run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
import vdit_compile as vc
from calib_helpers import tiny_wan_module, wan_inputs
model = tiny_wan_module()
inputs = [dict(wan_inputs(seed=s), timestep=torch.full((1,), t)) for s, t in ((1, 900), (2, 600), (3, 300), (4, 100))]
kill_at = int(sys.argv[2])
calls = [0]
def hook(m, a, kw):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
if kill_at:
    model.register_forward_pre_hook(hook, with_kwargs=True)
cfg = vc.OptimizeConfig(error_budget=0.3, step_ranges=2, families=("tile", "win3d", "spatial"), tile_tokens=4,
                        progress=False, calib_checkpoint=sys.argv[1] or None)
vc.optimize(model, calib_inputs=inputs, config=cfg)
vc.plan_of(model).save(sys.argv[3])
print("DONE")
'''


def _run(tmp_path, ck, kill_at, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=str(ROOT / "tests")), ck, str(kill_at), out],
                          env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_plan(tmp_path):
    import json

    ck = str(tmp_path / "calib.ckpt")
    r = _run(tmp_path, ck, 3, str(tmp_path / "never.json"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    saved = torch.load(ck, weights_only=False)
    assert saved["phase"] == "stats" and saved["done"] == 2  # the two finished calls, nothing half-written
    assert not list(tmp_path.glob("*.tmp*"))
    r = _run(tmp_path, ck, 0, str(tmp_path / "resumed.json"))
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr[-3000:]
    r = _run(tmp_path, "", 0, str(tmp_path / "straight.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((tmp_path / "resumed.json").read_text())
    b = json.loads((tmp_path / "straight.json").read_text())
    assert a["sites"] == b["sites"] and a["calibration"] == b["calibration"]
    assert any(s.get("masks") for s in a["sites"])


def test_checkpoint_of_other_work_is_refused(tmp_path):
    from vdit_compile.calibration.checkpoint import (
        CHECKPOINT_FORMAT,
        atomic_save,
        load_checkpoint,
    )

    p = tmp_path / "c.ckpt"
    atomic_save({"format": CHECKPOINT_FORMAT, "key": {"num_inputs": 3}}, p)
    with pytest.raises(ValueError, match="other work"):
        load_checkpoint(p, {"num_inputs": 4})
    assert load_checkpoint(tmp_path / "none.ckpt", {}) is None
