#!/usr/bin/env bash
# Before a GPU run: every Triton kernel launch the interpreter tests make, compiled for a Hopper GPU (sm_90)
# with the Triton release the lent machines have, on this machine (no GPU needed; triton ships ptxas). A
# compile error found on the GPU costs a scarce run (15 minutes a session); found here, it costs nothing.
#   bash tools/check_sm90.sh          (GPU_TRITON=3.6.0: what runs 1-4's H200 machines had; SM90_TESTS to
#                                      record other tests than tests/kernels and tests/inference)
# Records the launches with the project's venv (the interpreter), then compiles them in a venv of its own
# (torch 2.13.0 and triton $GPU_TRITON, kept in ~/.cache/layerfold for the next time). About 30 minutes on
# 2 cores (6 to record, the rest to compile some 700 kernel variants); exit 1 names what failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
GPU_TRITON=${GPU_TRITON:-3.6.0}
VENV=${SM90_VENV:-$HOME/.cache/layerfold/venv-triton-$GPU_TRITON}
TESTS=${SM90_TESTS:-tests/kernels tests/inference}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
say() { printf '[check_sm90] %s\n' "$*"; }
quiet() { grep -v "^WARNING: Location" || true; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$GPU_TRITON')"; then
  say "a venv with torch 2.13.0 and triton $GPU_TRITON -> $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.13.0 numpy 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q --no-deps "triton==$GPU_TRITON" 2>&1 | quiet  # not torch's own pin
fi

say "recording the launches of: $TESTS"
# shellcheck disable=SC2086
(cd "$ROOT" && "$PY" tools/compile_sm90.py capture "$WORK/launches.json" -- $TESTS -q)
say "compiling them for sm_90 with triton $GPU_TRITON"
(cd "$ROOT" && "$VENV/bin/python" tools/compile_sm90.py compile "$WORK/launches.json" --arch 90)
