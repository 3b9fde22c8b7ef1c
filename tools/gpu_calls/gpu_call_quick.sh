#!/usr/bin/env bash
# The shortest GPU check (~1.5 min): the GPU tests of the code changed since the last GPU call, first the block-mass
# kernels (kernels/block_stats_triton.py), then CUDA autocast through optimize; -v so a cut-short box still says
# which passed. Log under $OUT.   bash tools/gpu_calls/gpu_call_quick.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT to the output folder}"
timeout 40 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout ${BOX:-120} python3 -m pytest -v -p no:cacheprovider -m gpu -rs tests/test_calib_block_stats.py tests/test_bad_input_api.py \
  tests/test_parallel_units.py 2>&1 | tee $OUT/gpu-quick.log | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed"
