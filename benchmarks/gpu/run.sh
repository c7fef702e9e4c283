#!/usr/bin/env bash
# The GPU suite on a bare CUDA machine: set-up, then benchmarks/gpu/suite.py.
#
#   bash benchmarks/gpu/fetch_wheels.sh     # here, once: the locked pure-Python packages -> .whl/
#   bash benchmarks/gpu/run.sh              # there: results in $OUT (or runs/gpu)
#   bash benchmarks/gpu/run.sh --dry-run    # any machine: tiny shapes on the CPU, Triton's interpreter
#
# The machine's own torch, Triton and CUDA are used as they are (their CUDA builds are far larger
# than what travels); transformers, peft, TRL and their small dependencies are installed from the
# locked wheels in .whl/ when that folder exists (GPU_WHEELS=0: never), into a private folder first on PYTHONPATH, so the
# kernels run under the same transformers as CI. Extra arguments go to suite.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD"
if [ "${GPU_WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/alignloop-gpu-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$site:$PWD"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
  --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$python" benchmarks/gpu/suite.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
