#!/usr/bin/env bash
# The output check and the exact pass's unit products on CUDA (written 2026-12-07 after a CPU-only session):
#   1. SiteCalibrator(method="exact") on CUDA (the whole-unit products) against the same statistics on the CPU, with
#      text before and after the video, float32 and float64;
#   2. `vdit-compile demo --device cuda` on the embedded model (default: output check at 34 dB), its time and lines.
#   bash tools/gpu_calls/gpu_call_output_check.sh        ($OUT: call.log, demo/summary.json, demo/plan.json)
source "$(dirname "$0")/_preamble.sh"
python3 - <<'PY'
import torch
from vdit_compile.calibration import SiteCalibrator
from vdit_compile.layout import TokenLayout
for lay in (TokenLayout(3, 4, 4, 2, 3), TokenLayout(16, 8, 8)):
    for dt in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, lay.seq_len, 16, generator=g, dtype=dt) for _ in range(3))
        res = []
        for dev in ("cpu", "cuda"):
            cal = SiteCalibrator("s", lay, 2, families=("tile", "win3d", "spatial"), tile_tokens=4, method="exact")
            cal.observe(q.to(dev), k.to(dev), v.to(dev), 0.25)
            res.append(cal.candidate_errors().cpu())
        diff = (res[0] - res[1]).abs().max().item()
        print(f"exact pass cuda vs cpu {lay.describe()} {dt}: max |diff| {diff:.2e} over {res[0].numel()} errors")
        assert diff < (1e-9 if dt == torch.float64 else 1e-4), diff
PY
echo "exact pass check rc=$? ($(( $(date +%s) - start ))s)"
timeout 240 python3 -m vdit_compile.cli.main demo --device cuda --no-gif --out "$OUT/demo" 2>&1 | grep -v "it/s\]\|s/it\]\|video/s\]\|s/video\]" | tail -45
echo "demo rc=${PIPESTATUS[0]} call total $(( $(date +%s) - start ))s"
