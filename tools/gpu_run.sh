#!/usr/bin/env bash
# One device-tool call of bench/gpu_suite.py: the suite writes into a scratch folder and what comes back is
# packed under $OUT (the tool returns at most 8 files, 2 folders down): gpu_suite.md, gpu_suite.json, the
# GPU's state before and after, and NAME.tgz with every part's JSON and the server log. The suite runs under
# a hard timeout a little past its own budget, so the packing always happens.
# Usage (on the GPU machine, repository root):
#   bash tools/gpu_run.sh NAME BUDGET_S PARTS [gpu_suite options, e.g. --limit tests=100]
#   SUITE_TINY=1 OUT=/tmp/o bash tools/gpu_run.sh t 600 env,decode     (the same on a CPU, --tiny)
set -u
name=$1 budget=$2 parts=$3
shift 3
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-$(command -v python3 || command -v python)}
work=${SUITE_WORK:-/tmp/layerfold-$name}
rm -rf "$work"
mkdir -p "$OUT"
gpu_state() { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$OUT/gpu_state.csv" 2>&1; }
gpu_state
tiny=()
[ -n "${SUITE_TINY:-}" ] && tiny=(--tiny)
timeout -k 10 $((${budget%.*} + 40)) "$PY" bench/gpu_suite.py --out "$work" --budget-s "$budget" --parts "$parts" "${tiny[@]}" "$@"
rc=$?
gpu_state
cp "$work"/gpu_suite.md "$work"/gpu_suite.json "$OUT"/ 2>/dev/null
tar czf "$OUT/$name.tgz" -C "$(dirname "$work")" "$(basename "$work")"
echo "[gpu_run] suite exit $rc; packed $(tar tzf "$OUT/$name.tgz" | wc -l) entries into $name.tgz"
exit $rc
