#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git; carried to a device machine), the wheels that
# benchmarks/gpu/run.sh installs there: the locked versions (locks/main.txt) of the pure-Python
# packages the suite needs beyond a CUDA image's torch/Triton, for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/../.."
packages="transformers peft trl huggingface_hub kernels regex hf-xet httpx2 httpcore2 click tomlkit truststore idna anyio"
pins=()
for name in $packages; do
  pin=$(grep -iE "^${name//_/[-_]}==" locks/main.txt) || { echo "$name is not in locks/main.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
du -sh .whl
