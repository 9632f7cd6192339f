#!/usr/bin/env bash
# Build layerfold's wheel and prove it works where users install it: a fresh venv that cannot see the
# source tree, beside a distribution named `kernels` (as Hugging Face publishes one). CI runs this after
# the test suite (.ci/run); run it yourself after any packaging change:  bash tools/check_wheel.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
say() { printf '[check_wheel] %s\n' "$*"; }
fail() { printf '[check_wheel] FAILED: %s\n' "$*" >&2; exit 1; }

say "building the wheel"
$PY -m pip wheel --no-deps -q -w "$WORK/dist" "$ROOT" >/dev/null
WHL=$(ls "$WORK"/dist/layerfold-*.whl)
unzip -l "$WHL" | grep -q "layerfold/kernels/cpu_decode.cpp" || fail "the native step's C++ source is not in the wheel"
if unzip -l "$WHL" | awk '{print $4}' | grep -qE '^(engine|kernels)/'; then
  fail "the wheel has top-level engine/ or kernels/ folders"
fi

say "fresh venv; torch 2.13.0 first (a looser pin would fetch a CUDA build), then the wheel alone"
$PY -m venv "$WORK/venv"
V="$WORK/venv/bin"
$V/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
$V/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
$V/python -m pip install -q "$WHL" 2>&1 | grep -v "^WARNING: Location" || true
cd "$WORK"  # nowhere near the source tree
export LAYERFOLD_CACHE="$WORK/cache" PYTHONDONTWRITEBYTECODE=1

say "installed commands"
$V/layerfold --version
$V/python -m layerfold --version >/dev/null
$V/layerfold --help >/dev/null
$V/layerfold inspect --help >/dev/null
$V/python - <<'PY'
import importlib, sys
for name in ("engine", "kernels"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    sys.exit(f"`import {name}` works in the wheel's venv: a top-level name other than layerfold was installed")
import layerfold
m = layerfold.build_model(layerfold.ModelSpec(vocab_size=67, d_model=32, layers=(
    layerfold.LayerSpec(32, 32, 32, 4, 2, 8, 48), layerfold.LayerSpec(32, 32, 32, d_ffn=40, has_attn=False, kind="mlp"))))
layerfold.save_checkpoint("tiny", m.spec, m.state_dict(), provenance={"source": "check_wheel"})
PY
$V/layerfold inspect tiny --json | $V/python -c "import json,sys; d=json.load(sys.stdin); assert d['layers'][1]['kind']=='mlp', d"
say "without the serve extra, serve says what to install"
if $V/layerfold serve tiny --port 1 2>"$WORK/err"; then fail "serve ran without fastapi"; fi
grep -q "layerfold\[serve\]" "$WORK/err" || { cat "$WORK/err"; fail "serve's error does not name the extra"; }

say "extras (all): every module imports, and the native CPU step builds from the installed C++ source"
$V/python -m pip install -q "${WHL}[all]" 2>&1 | grep -v "^WARNING: Location" || true
$V/python - <<'PY'
import importlib, pkgutil
import layerfold
mods = [m.name for m in pkgutil.walk_packages(layerfold.__path__, "layerfold.") if not m.name.endswith("__main__")]
for name in mods:
    importlib.import_module(name)
print(f"[check_wheel] {len(mods)} modules import")
from layerfold.inference.native import SOURCE, _library
lib, why = _library()
assert SOURCE.is_file() and "site-packages" in str(SOURCE), SOURCE
print("[check_wheel] native step from", SOURCE.name, "->", "built" if lib is not None else f"not built here: {why}")
PY

say "beside a distribution named kernels"
$V/python - "$WORK/kernels-0.0.1-py3-none-any.whl" <<'PY'
import base64, hashlib, sys, zipfile
files = {
    "kernels/__init__.py": "__version__ = '0.0.1'\n\ndef get_kernel(repo_id):\n    return f'stand-in kernel {repo_id}'\n",
    "kernels-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n",
    "kernels-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: check_wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
rec = []
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rec.append(f"{name},sha256={digest},{len(data)}")
    z.writestr("kernels-0.0.1.dist-info/RECORD", "\n".join(rec + ["kernels-0.0.1.dist-info/RECORD,,"]) + "\n")
PY
$V/python -m pip install -q "$WORK/kernels-0.0.1-py3-none-any.whl" 2>&1 | grep -v "^WARNING: Location" || true
$V/python -c "
from kernels import get_kernel
import layerfold.kernels as K
assert get_kernel('x') == 'stand-in kernel x' and K.COS_EPS > 0
import transformers
print('[check_wheel] kernels (stand-in) and layerfold.kernels both import; transformers', transformers.__version__)"
$V/layerfold inspect tiny >/dev/null
$V/python -m pip uninstall -q -y layerfold
$V/python -c "from kernels import get_kernel; assert get_kernel('y')" || fail "uninstalling layerfold broke the kernels distribution"
say "ok"
