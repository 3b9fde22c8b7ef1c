#!/usr/bin/env bash
# The next session's first device call (~9 min; ask for kind nvidia-h100-x1: issues 19 and 20 state H100 targets):
# (1) the GPU tests that have not run on it (tools/gpu_calls/gpu_call_final.sh);
# (2) one calibration observation per shape with the fused kernel: time and extra memory after the memory change of
#     2026-12-07 (BENCHMARKS.md run 12: 318 MiB at Wan-14B before, ~122 MiB on the CPU after);
# (3) the families benchmark with automatic padding on an H100 in the time left.  Logs under $OUT.
#   bash tools/gpu_calls/gpu_call_next.sh      (carry .gpu-wheels and .whl)
# Then, on the warm machine:
#   WAN_LAYERS=40 bash tools/gpu_calls/gpu_call_wan14b.sh       (issue 19's Wan-14B target on an H100)
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
echo "== 1. GPU tests on the padded code"
BOX=${FINAL_BOX:-180} bash tools/gpu_calls/gpu_call_final.sh
echo "== 2. calibration observation, fused ($(( $(date +%s) - start ))s)"
PYTHONPATH=$PWD timeout ${CALIB_BOX:-120} python3 benchmarks/calibration.py --methods mass --kernels fused \
  --json $OUT/calib.jsonl > $OUT/calib.log 2>&1; echo "calibration rc=$?"
python3 tools/calib_summary.py $OUT/calib.jsonl
used=$(( $(date +%s) - start ))
echo "== 3. families, automatic padding (${used}s used)"
TOTAL=$(( ${CALL_BOX:-570} - used )) bash tools/gpu_calls/gpu_call_pad.sh 2>&1 | grep -v "^tests/"
echo "call total $(( $(date +%s) - start ))s"
