#!/usr/bin/env bash
# One device call (~9 min, H100) that (1) runs the whole GPU suite (`-m gpu`) on the tree as committed, with torchao for
# the FP8 test, (2) measures one calibration observation per benchmark shape with both block-statistics kernels
# (fused, two-pass), then (3) applies patches/unit-padding.patch on the device's copy and runs the padded kernels' GPU
# tests and the families benchmark with automatic padding (tools/gpu_calls/gpu_call_pad.sh) in the time left.
# Logs and JSON rows under $OUT.   bash tools/gpu_calls/gpu_call_verify.sh   (carry .gpu-wheels and .whl)
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
echo "== 1. GPU suite (tree as committed)"
PYTHONPATH=$PWD:/tmp/site timeout ${SUITE_BOX:-200} python3 -m pytest -v -p no:cacheprovider -m gpu -rs tests \
  > $OUT/gpu-suite.log 2>&1; echo "gpu suite rc=$? (124: box ran out)"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu-suite.log | tail -8
echo "== 2. calibration observation, fused vs two-pass ($(( $(date +%s) - start ))s)"
PYTHONPATH=$PWD timeout ${CALIB_BOX:-120} python3 benchmarks/calibration.py --methods mass --kernels fused,twopass \
  --json $OUT/calib.jsonl > $OUT/calib.log 2>&1; echo "calibration rc=$?"
python3 tools/calib_summary.py $OUT/calib.jsonl
[ -n "${SKIP_PAD:-}" ] && { echo "call total $(( $(date +%s) - start ))s (padding skipped)"; exit 0; }
echo "== 3. unit padding ($(( $(date +%s) - start ))s)"
[ -f patches/unit-padding.patch ] && (git apply patches/unit-padding.patch || patch -p1 -s < patches/unit-padding.patch) && echo "patch applied"  # merged into main since 377232d
used=$(( $(date +%s) - start ))
TOTAL=$(( ${CALL_BOX:-575} - used )) bash tools/gpu_calls/gpu_call_pad.sh
echo "call total $(( $(date +%s) - start ))s"
