#!/usr/bin/env bash
# Issue 19's end-to-end target in one device call: the Wan-14B-shaped transformer (random weights, WAN_LAYERS layers,
# 40 = the whole model) calibrated on 2 prompts x 4 steps with every family scored and the plan written; the block-
# statistics kernel from MASS_KERNEL (fused | twopass, default: the library's). Logs, the JSON row and the plan under $OUT.
#   MASS_KERNEL=fused WAN_LAYERS=40 bash tools/gpu_calls/gpu_call_wan14b.sh
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
box=$(( ${CALL_BOX:-585} - ($(date +%s) - start) ))
echo "wan14b: ${WAN_LAYERS:=40} layers, kernel ${MASS_KERNEL:-default}, box ${box}s"
timeout $box python3 benchmarks/calibration.py --wan14b --layers $WAN_LAYERS ${MASS_KERNEL:+--mass-kernel $MASS_KERNEL} \
  --plan $OUT/wan14b-plan.json --json $OUT/wan14b.jsonl > $OUT/wan14b.log 2>&1
echo "wan14b rc=$? (124: box ran out)"; grep "^\[wan14b\]" $OUT/wan14b.log | tail -4
tail -c 400 $OUT/wan14b.log | tr '\r' '\n' | tail -2; cat $OUT/wan14b.jsonl 2>/dev/null
echo "total $(( $(date +%s) - start ))s"
