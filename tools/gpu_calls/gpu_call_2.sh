#!/usr/bin/env bash
# Session 2026-12-06, GPU call 2: the new GPU tests (block statistics kernel, FP8 linears, CUDA autocast), the window
# families on block-aligned tiles with FlexAttention beside them, the calibration cost per observation, and the
# FP8 step rows if time is left; each step time-boxed so the call ends in ~4.5 minutes (device time was short). Results under $OUT.
set -u
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton, torchao; print(torch.__version__, triton.__version__, torchao.__version__)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_calib_block_stats.py tests/test_wholestep_fp8.py tests/test_bad_input_api.py > $OUT/gpu-tests2.log 2>&1; echo "gpu tests rc=$?"; tail -4 $OUT/gpu-tests2.log
timeout 75 python3 benchmarks/families.py --padded --shapes wan14b-81f-720p --masks win3d-t4h1w1 win3d-t1h1w1 --rep 25 --out $OUT/families-padded.jsonl > $OUT/families.log 2>&1; echo "families rc=$?"
timeout 60 python3 benchmarks/calibration.py --methods mass --json $OUT/calib.jsonl > $OUT/calib.log 2>&1; echo "calibration rc=$?"; tail -12 $OUT/calib.log
l=$(left 270); echo "fp8 step: ${l}s"
[ $l -gt 60 ] && timeout $l python3 benchmarks/step.py --fp8 --layers 4 --globals 1 --no-flex --frames 24 8 --kept-fraction 0.54 --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"; tail -8 $OUT/step.log
python3 tools/families_summary.py $OUT/families-padded.jsonl
