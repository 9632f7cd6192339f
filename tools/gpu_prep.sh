#!/usr/bin/env bash
# What bench/gpu_suite.py needs on a bare GPU machine (no network, no package registry), made here on a
# machine with one, in the checkout, where the device tool's copy of the working tree picks it up:
#   .whl/                  the server's wheels (fastapi, uvicorn, prometheus_client and everything they need),
#                          resolved for the GPU machine's Python and platform; the serve part installs them
#                          into a folder of its own when the machine lacks them
#   .gpu_assets/tokenizer  the embedded model's tokenizer, saved in a form every transformers reads
# Usage: bash tools/gpu_prep.sh            (GPU_PYTHON=3.12 GPU_PLATFORM=manylinux_2_17_x86_64 by default:
#                                           what the lent H100/H200 machines ran in runs 1 and 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
GPU_PLATFORM=${GPU_PLATFORM:-manylinux_2_17_x86_64}
say() { printf '[gpu_prep] %s\n' "$*"; }

say "server wheels for Python $GPU_PYTHON on $GPU_PLATFORM -> .whl/"
rm -rf "$ROOT/.whl.new"
# with their dependencies, resolved for that Python and platform (binary wheels only: nothing is built there)
$PY -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" --platform "$GPU_PLATFORM" \
    -d "$ROOT/.whl.new" fastapi uvicorn prometheus_client 2>&1 | grep -v "^WARNING: Location" || true
ls "$ROOT"/.whl.new/fastapi-*.whl "$ROOT"/.whl.new/uvicorn-*.whl >/dev/null  # fail loudly if the download failed
rm -rf "$ROOT/.whl" && mv "$ROOT/.whl.new" "$ROOT/.whl"
say "$(ls "$ROOT/.whl" | wc -l) wheels: $(ls "$ROOT/.whl" | sed 's/-[0-9].*//' | tr '\n' ' ')"

say "the embedded model's tokenizer -> .gpu_assets/tokenizer"
(cd "$ROOT" && $PY -c "
from layerfold.core.checkpoint import save_tokenizer
from layerfold.core.loading import load_tokenizer, resolve
save_tokenizer(load_tokenizer(resolve('smollm2-135m', quiet=True)), '.gpu_assets/tokenizer')")
say "ok: the device tool carries .gpu_assets/ (untracked); name .whl in its carry list (ignored by git)"
