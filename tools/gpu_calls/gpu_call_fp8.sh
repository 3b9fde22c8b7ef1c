#!/usr/bin/env bash
# Issue 20 on an H100 (one call, ~9 min): FP8 linears through torchao after the swap stopped changing inductor's
# process-wide settings (set_inductor_config=False, 2026-12-07):
#   (1) the FP8 GPU test (real torchao kernels vs the emulation; inductor's config left alone);
#   (2) the OSP-shaped step, all 32 layers, 93 and 29 frames: dense bf16 cuDNN, tile, tile + inductor,
#       tile + inductor + FP8 linears, side by side in one run (the FP8 compile of 32 layers did not finish in
#       420 s in run 13, with torchao's default inductor settings);
#   (3) FP8 quality on the embedded model against bf16 (64 held-out prompts x 50 steps).
#   bash tools/gpu_calls/gpu_call_fp8.sh         (carry .gpu-wheels and .whl)
# $OUT: call.log, fp8-test.log, step.jsonl, step.log, wholestep_quality.jsonl, quality.log
source "$(dirname "$0")/_preamble.sh"   # set -u, $OUT, $start, repo root, call.log, wheels, versions
echo "== 1. FP8 GPU test ($(( $(date +%s) - start ))s)"
timeout ${TEST_BOX:-120} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wholestep_fp8.py > $OUT/fp8-test.log 2>&1
echo "test rc=$?"; tail -3 $OUT/fp8-test.log
echo "== 2. step, 32 layers, 93f and 29f ($(( $(date +%s) - start ))s)"
timeout -k 10 ${STEP_BOX:-300} python3 benchmarks/step.py --frames 24 8 --globals 1 --fp8 --no-flex \
  --kept-fraction 0.54 --out $OUT > $OUT/step.log 2>&1
echo "step rc=$?"
python3 - <<'PY' "$OUT/step.jsonl"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "way" in r:
        print(r["frames"], r["way"], round(r.get("step_ms", 0), 1), "ms", "x%.2f" % r.get("speedup", 1),
              "compile %ss" % r.get("first_call_s", "-"), r.get("error", "")[:120])
PY
left=$(( ${CALL_BOX:-580} - ($(date +%s) - start) - 10 ))
echo "== 3. FP8 quality on the embedded model, ${left}s left"
timeout -k 5 $left python3 benchmarks/wholestep_quality.py --prompts 64 --batch-size 16 --variants none fp8 --fp8 on \
  --out $OUT > $OUT/quality.log 2>&1
echo "quality rc=$?"; tail -5 $OUT/quality.log
echo "call total $(( $(date +%s) - start ))s"
