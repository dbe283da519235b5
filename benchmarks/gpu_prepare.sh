#!/usr/bin/env bash
# Builds .gpu/, what benchmarks/gpu_device.sh needs on a lent GPU machine without a package index
# (docs/gpu.md), here, where the package index can be reached:
#   .gpu/whl   wheels of what that machine lacks, for its Python (PYVER, default 3.12): faiss-cpu bm25s
#              PyStemmer pytrec-eval-terrier stop-words gguf, at the versions this checkout's .venv has
#   .gpu/smol  the embedded model's config.json and tokenizer files (its weights stay here: gpu_device.sh
#              builds the same shape with random weights there)
# Then, with the device tool: carry [".gpu"], command `OUT=$OUT bash benchmarks/gpu_device.sh --shape 7b`.
# A rehearsal of the whole runner on this CPU, with wheels for this machine's Python in another folder:
#   PYVER=3.11 GPU_DIR=/tmp/gpu_dry bash benchmarks/gpu_prepare.sh
#   GPU_DIR=/tmp/gpu_dry PY=.venv/bin/python OUT=/tmp/gpu_dry/out bash benchmarks/gpu_device.sh --tiny --cpu
#
#   bash benchmarks/gpu_prepare.sh        # PYVER=3.12 PY=.venv/bin/python GPU_DIR=.gpu by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
PACKAGES=(faiss-cpu bm25s PyStemmer pytrec-eval-terrier stop-words gguf)
DEST=${GPU_DIR:-.gpu}
NEW=$DEST.new
rm -rf "$NEW"
mkdir -p "$NEW/whl" "$NEW/smol"

# Each package at the version installed here (the one the tests ran with).
pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
        || { echo "gpu_prepare: $name is not installed in $PY's environment (make install first)" >&2; exit 2; }
    pins+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$NEW/whl" "${pins[@]}"

# The embedded model's config and tokenizer, from its converted copy (converted on first use).
"$PY" - "$NEW/smol" <<'PY'
import shutil, sys
from pathlib import Path
from llara.modeling.loading import resolve_model

src, dst = Path(resolve_model("default").path), Path(sys.argv[1])
weights = (".safetensors", ".gguf", ".bin", ".pt")
copied = [f.name for f in sorted(src.iterdir()) if f.is_file() and not f.name.endswith(weights)]
for name in copied:
    shutil.copy(src / name, dst / name)
if "config.json" not in copied:
    sys.exit(f"gpu_prepare: no config.json in {src}")
print("smol:", ", ".join(copied))
PY

rm -rf "$DEST"
mv "$NEW" "$DEST"
du -sh "$DEST/whl" "$DEST/smol"
ls "$DEST/whl"
