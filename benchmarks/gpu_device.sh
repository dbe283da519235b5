#!/usr/bin/env bash
# GPU check on a lent GPU machine without a package index (torch, transformers, peft, accelerate
# installed there; see docs/gpu.md). From the repository root, with two ignored folders carried over:
#   .gpu/whl   cp312 wheels of what that machine lacks: faiss-cpu bm25s PyStemmer pytrec-eval-terrier
#              stop-words gguf (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .gpu/smol  config.json + tokenizer files of the embedded model (from $LLARA_CACHE/models/*): its
#              weights (98 MB GGUF) do not travel, so a model of the same shape with random weights is
#              built there; throughput, memory and equivalence checks are valid on it, losses are not.
#   OUT=/some/dir bash benchmarks/gpu_device.sh [gpu_check.py options]
# benchmarks/gpu_prepare.sh builds .gpu/ (and rehearses this script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
G=${GPU_DIR:-$PWD/.gpu}
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
rm -rf /tmp/llara-site
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/llara-site "$G"/whl/*.whl || exit 3
export PYTHONPATH=/tmp/llara-site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia.txt" 2>&1
$PY - "$G/smol" /tmp/llara-smol <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
import transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__)
PY
$PY benchmarks/gpu_check.py --model /tmp/llara-smol --out "$OUT/gpu_check.json" "$@" 2>&1 \
    | grep -v "Loading weights\|Writing model" > "$OUT/log.txt"
rc=${PIPESTATUS[0]}
tail -c 3000 "$OUT/log.txt"
echo "exit $rc"
exit $rc
