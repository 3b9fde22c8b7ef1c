#!/usr/bin/env bash
# Automatic unit padding (kernels/padding.py), one device call of at most ~300 s on one H100: the kernels' GPU tests
# (the new padded cases first: tests/test_kernel_pad.py, then tests/test_kernel_gpu.py, whatever fits the box), then
# benchmarks/families.py on the real 720p / CogVideoX shapes with the op's automatic padding ("auto-padded" rows),
# the unpadded op on the same inputs (ours_plain_*), cuDNN dense and FlexAttention (Wan only: its compiles are slow),
# forward and forward+backward; every step under `timeout`; logs and JSON lines under $OUT; a summary at the end.
#   bash tools/gpu_calls/gpu_call_pad.sh        (OUT must be set; .gpu-wheels/*.whl are installed with --no-deps)
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
TOTAL=${TOTAL:-290}
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 30 python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

# 1. GPU tests of the kernels, the padded cases first (-v: one line per test, so a box that runs out still says which passed)
timeout 100 python3 -m pytest -v -p no:cacheprovider -m gpu -rs tests/test_kernel_pad.py tests/test_kernel_gpu.py \
  > $OUT/gpu-tests-pad.log 2>&1; echo "gpu tests rc=$? (124: the 100 s box ran out)"
echo "passed $(grep -c ' PASSED' $OUT/gpu-tests-pad.log), failed $(grep -c ' FAILED' $OUT/gpu-tests-pad.log), skipped $(grep -c ' SKIPPED' $OUT/gpu-tests-pad.log)"
grep -E ' FAILED|^E  ' $OUT/gpu-tests-pad.log | head -20

# 2. families on the real shapes, automatic padding beside the unpadded op, cuDNN and Flex, inside what is left
l=$(left); echo "families: ${l}s left"
if [ $l -gt 30 ]; then
  timeout $(( l - 5 )) python3 benchmarks/families.py --auto-pad --plain-too --budget $(( l - 20 )) --rep 25 \
    --shapes wan14b-81f-720p hunyuan-129f-720p osp-93f-720p osp-29f-720p cogvideox5b-49f \
    --masks win3d-t4h1w1 win3d-t1h1w1 spatial-h0w0-g1 --flex-shapes wan14b-81f-720p \
    --out $OUT/families-auto-padded.jsonl > $OUT/families-auto-padded.log 2>&1
  echo "families rc=$? (124: timed out; rows so far are kept)"
  grep -E "Error|error" $OUT/families-auto-padded.log | grep -v '"' | tail -5
fi

# 3. summary
timeout 20 python3 - <<'PY'
import json, os
p = os.environ['OUT'] + '/families-auto-padded.jsonl'
rows = [json.loads(l) for l in open(p)] if os.path.exists(p) else []
f = lambda x, n=1: '-' if x is None else f'{x:.{n}f}'
print('shape | mask | P->stride | dens | cuDNN f/fb ms | auto f/fb ms | plain f/fb ms | auto/plain f,fb | x cuDNN f,fb | kept/cuDNN f,fb | Flex f/fb ms | gather ms')
for r in rows:
    if 'skipped' in r:
        print(r['shape'], 'skipped:', r['skipped']); continue
    g = r.get
    print(f"{r['shape'][:14]} | {r['mask']} | {r['unit_tokens']}->{g('unit_stride')} | {f(r['density'], 3)} | "
          f"{f(g('cudnn_fwd_ms'))}/{f(g('cudnn_fwdbwd_ms'))} | {f(g('ours_fwd_ms'), 2)}/{f(g('ours_fwdbwd_ms'), 2)} | "
          f"{f(g('ours_plain_fwd_ms'), 2)}/{f(g('ours_plain_fwdbwd_ms'), 2)} | {f(g('x_auto_vs_plain_fwd'), 2)},{f(g('x_auto_vs_plain_fwdbwd'), 2)} | "
          f"{f(g('x_vs_cudnn_fwd'), 2)},{f(g('cudnn_fwdbwd_ms') / g('ours_fwdbwd_ms') if g('ours_fwdbwd_ms') and g('cudnn_fwdbwd_ms') else None, 2)} | "
          f"{f(g('kept_tflops_over_cudnn_fwd'), 2)},{f(g('kept_tflops_over_cudnn_fwdbwd'), 2)} | "
          f"{f(g('flex_fwd_ms'), 2)}/{f(g('flex_fwdbwd_ms'), 2)} {g('flex_skipped') or (g('flex_error') or '')[:60]} | {f(g('reorder_ms'), 2)}"
          + (f" | relerr vs plain {g('ours_vs_plain_relerr'):.1e}" if g('ours_vs_plain_relerr') is not None else '')
          + (f" | ERROR {g('ours_error')[:120]}" if g('ours_error') else ''))
PY
echo "total $(( $(date +%s) - start ))s"; ls -la $OUT
