"""tools/compile_sm90.py: the launches the interpreter tests make are recorded with their signatures, and
each compiles for a Hopper GPU (sm_90) on this CPU machine (triton ships ptxas); a launch that cannot
compile is reported by name and fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.skipif(not NEW_API, reason="triton < 3.3 compiles ahead of time through another API")
@pytest.mark.parametrize("norm,swiglu", [(False, False), (True, False), (False, True)])
def test_batch1_gemv_loop_streams_the_weight_tile(tmp_path: Path, norm: bool, swiglu: bool) -> None:
    """The batch-1 GEMV (the decode step's matrix products on the GPU), compiled for sm_90 as the JIT would
    (one row, aligned pointers and sizes): each loop iteration loads its weight tile in 16-byte loads and
    multiplies it where it lands. The former 3-D form moved every weight tile through shared memory (a
    layout conversion: 4-10 shared stores and barriers an iteration), which serialised the loop's warps."""
    from layerfold.kernels.heuristics import GEMV_CONFIGS

    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "r_ptr": "*bf16", "g_ptr": "*bf16",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "constexpr", "O": "i32", "K": "i32",
                 "stride_x": "i32", "eps": "fp32", **{k: "constexpr" for k in (
                     "HAS_BIAS", "HAS_RES", "SWIGLU", "NORM", "BLOCK_N", "BLOCK_O", "BLOCK_K", "SPLIT_K", "PDL")}}
    cfgs = [c for c in GEMV_CONFIGS if not (norm and c.split_k > 1)]
    entries = [{"module": "layerfold.kernels.gemv", "kernel": "_gemv_kernel", "signature": signature,
                "options": {"num_warps": c.warps, "num_stages": c.stages},
                "divisible": ["x_ptr", "w_ptr", "b_ptr", "r_ptr", "g_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "O", "K",
                              "stride_x"],
                "constexprs": {"N": 1, "HAS_BIAS": False, "HAS_RES": True, "SWIGLU": swiglu, "NORM": norm,
                               "BLOCK_N": 1, "BLOCK_O": c.block_o, "BLOCK_K": c.block_k, "SPLIT_K": c.split_k,
                               "PDL": False}} for c in cfgs]
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps(entries))
    r = _tool("loop", str(path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for cfg, loop in zip(cfgs, json.loads(r.stdout), strict=True):
        tile_loads = cfg.block_o * cfg.block_k * 2 // 16 // (32 * cfg.warps)  # 16-byte loads per thread
        assert loop["ldg128"] >= tile_loads and loop["ffma"] >= cfg.block_o * cfg.block_k // (32 * cfg.warps), \
            (cfg.name, loop)
        assert loop["sts"] <= 2 and loop["bar"] <= 4, (cfg.name, loop)  # the x vector at most, not the tile
