"""tools/compile_sm90.py: the launches the interpreter tests make are recorded with their signatures, and
each compiles for a Hopper GPU (sm_90) on this CPU machine (triton ships ptxas); a launch that cannot
compile is reported by name and fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compile_sm90.py"
NEW_API = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3)


def _tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _launches(tmp_path: Path) -> list[dict]:
    out = tmp_path / "launches.json"
    r = _tool("capture", str(out), "--", "tests/kernels/test_infer_kernels.py::test_rmsnorm",
              "tests/kernels/test_norm_gemv.py::test_strided_rows_and_configs", "-q")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_capture_then_compile_for_sm90(tmp_path: Path) -> None:
    launches = _launches(tmp_path)
    by_kernel = {e["kernel"]: e for e in launches}
    assert {"_rmsnorm_kernel", "_gemv_kernel"} <= set(by_kernel)
    norm = by_kernel["_rmsnorm_kernel"]
    # tensors as typed pointers, sizes as ints, constexprs by value, launch options apart
    assert norm["signature"]["x_ptr"].startswith("*") and norm["signature"]["BLOCK_D"] == "constexpr"
    assert isinstance(norm["constexprs"]["BLOCK_D"], int) and "num_warps" in norm["options"]
    assert norm["constexprs"]["PDL"] is False  # left out at the launch: recorded at its default
    assert "num_warps" not in norm["signature"]
    gemv = by_kernel["_gemv_kernel"]
    assert gemv["signature"]["K"] in ("i32", "i64") and gemv["constexprs"]["NORM"] is True
    chosen = tmp_path / "two.json"
    chosen.write_text(json.dumps([norm, gemv]))
    r = _tool("compile", str(chosen))
    if not NEW_API:  # the floors' triton: a clear refusal, not a traceback
        assert r.returncode == 2 and "Fix:" in r.stdout, r.stdout + r.stderr
        return
    # both have a PDL constexpr, so each is compiled with it off (as recorded) and on
    assert r.returncode == 0 and "4 of 4 compiled, 0 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_a_launch_that_does_not_compile_is_named(tmp_path: Path) -> None:
    norm = next(e for e in _launches(tmp_path) if e["kernel"] == "_rmsnorm_kernel")
    bad = {**norm, "constexprs": {**norm["constexprs"], "BLOCK_D": 3}}  # tl.arange needs a power of two
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([norm, bad]))
    r = _tool("compile", str(path))
    if not NEW_API:
        assert r.returncode == 2, r.stdout + r.stderr
        return
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and all("_rmsnorm_kernel" in f and "'BLOCK_D': 3" in f for f in fails)  # PDL off, on
    assert "2 of 4 compiled, 2 failed" in r.stdout
