#!/usr/bin/env bash
# The GPU tests that had not yet run on the code as it now stands (~1.5-2 min): the op-level kernel tests with unit
# padding on by default (kernels/options.py), the block-statistics kernels after their shared score helper, CUDA
# autocast through optimize, the parallel units.  -v so a cut-short box still says which passed.  Log under $OUT.
#   bash tools/gpu_calls/gpu_call_final.sh   (carry .gpu-wheels)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT to the output folder}"
timeout 40 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout ${BOX:-170} python3 -m pytest -v -p no:cacheprovider -m gpu -rs \
  tests/test_calib_block_stats.py tests/test_bad_input_api.py tests/test_parallel_units.py \
  "tests/test_kernel_gpu.py::test_every_family_through_the_op_on_gpu" "tests/test_kernel_gpu.py::test_op_under_torch_compile_with_backward" \
  "tests/test_kernel_gpu.py::test_rectangular_random_mask" "tests/test_kernel_gpu.py::test_automatic_path_choice" \
  "tests/test_kernel_gpu.py::test_mask_build_is_fast_on_gpu" tests/test_kernel_pad.py 2>&1 \
  | tee $OUT/gpu-final.log | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed"
echo "rc=${PIPESTATUS[0]}"
