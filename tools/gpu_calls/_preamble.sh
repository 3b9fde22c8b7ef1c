# Sourced by the device-call scripts (not run on its own): the setup every call shares.
#   set -u, unbuffered Python, $OUT required, $start (the call's start, for elapsed-time lines), the repository root
#   as working directory and on PYTHONPATH, stdout+stderr also into $OUT/call.log, the carried diffusers and torchao
#   wheels installed (torchao in its own pip line: one line for both once left torchao out), and the versions printed.
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=$PWD
exec > >(tee "$OUT/call.log") 2>&1
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | grep -v WARNING | tail -1
timeout 60 python3 -m pip install --no-deps -q .whl/torchao-*.whl 2>&1 | grep -v WARNING | tail -1
python3 -c "import torch, torchao, diffusers, triton; print(torch.__version__, torchao.__version__, diffusers.__version__, triton.__version__, torch.cuda.get_device_name())"
