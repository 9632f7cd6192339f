"""bench/gpu_suite.py --tiny: every part of the GPU suite runs on this CPU (tiny model, kernels in the Triton
interpreter), so the suite cannot rot between GPU runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402
import suite_parts  # noqa: E402


def _suite(out: Path, *args: str, timeout: float = 900) -> dict[str, Any]:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((out / "gpu_suite.json").read_text())


def test_tiny_suite_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    res = _suite(out, "--parts", "all")
    # decode-compile starts beside the tests (its compile overlaps them) and is waited for when they end
    want = [p for p in gpu_suite.PARTS if p != "decode-compile"]
    assert list(res["runner"]) == want[:2] + ["decode-compile"] + want[2:] and res["diagnose"] is False
    assert res["runner"]["decode-compile"]["beside"] == "tests" and res["runner"]["decode-compile"]["returncode"] == 0
    status = {name: part["status"] for name, part in res["parts"].items()}
    assert status == {name: "done" for name in status}, status
    dc = res["parts"]["decode-compile"]  # tiny: torch eager stands in for the compile, its rows kept apart
    assert dc["overlapped"] is True and dc["built_s"] > 0 and dc["held_s"] >= 0 and "rows" not in dc
    assert {r["batch"] for r in dc["stand_in_rows"]} == {1, 2} and dc["stand_in"].startswith("torch eager")
    # held until the tests part had ended: the runner's word came after the tests' last output, and the
    # part's wait ended after the word
    word = (out / ".decode-compile.go").stat().st_mtime
    assert word >= (out / ".tests.log").stat().st_mtime
    assert dc["started"] + dc["built_s"] + dc["held_s"] >= word - 0.5
    assert set(status) >= {"env", "tests", "decode", "decode-baselines", "decode-sdpa", "kernels", "calibration",
                           "serve", "calibration-big", "prune", "heal", "host-generate"}
    assert all(part["diagnose"] is False for part in res["parts"].values())
    tests = res["parts"]["tests"]  # two concurrent pytest shards over one collection, merged into one record
    n = tests["collected"]
    assert tests["returncode"] == 0 and len(tests["shards"]) == 2 and n > 2 and not tests["collect_errors"]
    assert sum(sh["tests"] for sh in tests["shards"]) == tests["counts"]["passed"] == n
    assert all(sh["returncode"] == 0 and sh["seconds"] > 0 and " passed in " in sh["summary"] for sh in tests["shards"])
    assert re.fullmatch(rf"{n} passed in [\d.]+s \(2 shards\)", tests["summary"]), tests["summary"]
    assert sum(1 for line in tests["tail"] if line.startswith("--- shard")) == 2
    sdpa = res["parts"]["decode-sdpa"]  # the attention A/B, after an untimed warm-up
    assert sdpa["warmup_s"] > 0 and "warmup_error" not in sdpa
    engines = list(dict.fromkeys(r["engine"] for r in sdpa["rows"]))
    # every choice ran, in DECODE_ATTNS order, the warm-up not among them
    assert engines == [f"layerfold-{a}-attn" for a in suite_parts.DECODE_ATTNS], (engines, sdpa["notes"])
    assert set(suite_parts.DECODE_ATTNS) == {"auto", "auto+pdl", "auto+normoff", "kernel", "early", "dot", "sdpa"}
    assert all(r["decode_tok_s"] > 0 and "picks" not in r for r in sdpa["rows"])  # no CUDA graphs on a CPU
    md = (out / "gpu_suite.md").read_text()
    assert "layerfold-sdpa-attn" in md
    assert re.search(rf"\*\*gpu tests\*\*: {n} passed in .*\(2 shards\); shards \d+ tests in \d+ s, \d+ tests", md)
    s = res["decode_summary"]
    assert set(s["pruned"]) == {"shortgpt", "streamline", "dynamic-slicing", "come"}
    for by_batch in s["pruned"].values():  # a pruned shape reads fewer bytes per step than the dense one
        assert all(v["predicted"] > 1 and v["speedup"] > 0 for v in by_batch.values())
    assert all(v["best_torch"] == "torch-eager" and v["vs_hf"] > 0 for v in s["batches"].values())
    calib = res["parts"]["calibration"]  # the timed rows only: the diagnostics wait for --diagnose
    rows = {r["config"]: r for r in calib["rows"]}
    assert set(rows) == {"plain", "default", "default+grams", "window only", "cka only", "channels only"}
    assert rows["plain"]["over_plain"] == 1.0 and calib["warmup_s"] > 0
    assert not {"profile", "profile_plain", "host_syncs", "plain_weights_on_device_s"} & set(calib)
    serve = res["parts"]["serve"]["rows"]
    assert [(r["clients"], r["sampling"]) for r in serve] == [(1, "greedy"), (2, "greedy"), (2, "shaped")]
    assert all(r["tokens_s"] > 0 for r in serve)
    prune = {(r["method"], r["weights"]): r for r in res["parts"]["prune"]["rows"]}  # the whole pipeline
    assert list(prune) == [("shortgpt", "device"), ("streamline", "device"), ("dynamic-slicing", "device")]
    assert prune["shortgpt", "device"]["layers"] == prune["streamline", "device"]["layers"] - 1 == 3
    assert all(r["params_ratio"] < 1 and {"load", "calibrate", "method", "save"} <= set(r["times"])
               for r in prune.values())
    heal = {r["config"]: r for r in res["parts"]["heal"]["rows"]}
    assert heal["changed layers only"]["global_params"] == "changed"
    assert heal["teacher in host memory"]["teacher"] == "host" and heal["default"]["teacher"] == "device"
    for r in heal.values():  # both stages ran and report their rate; the student is back in its own dtype
        assert set(r["tokens_s"]) == {"layer", "global"} and min(r["tokens_s"].values()) > 0, r
        assert r["dtypes_after"] == ["torch.float32"]
    gen = res["parts"]["host-generate"]["rows"]  # generation with the weights streamed from host memory
    assert [r["batch"] for r in gen] == [1, 2] and all(r["tok_s"] > 0 and r["pct_of_bound"] > 0 for r in gen)
    pick = re.search(r"- attention, 2 rows: default .* fastest variant `layerfold s16 (\w+) x(\w+)`", md)
    assert pick and pick[1] in ("plain", "early", "dot") and pick[2] in ("1", "2"), md[-3000:]  # the sweep's pick
    for heading in ("## Decode", "## Calibration kernels", "## Decode kernels", "## Serving", "## Big calibrations",
                    "## layerfold prune on the GPU", "## layerfold heal on the GPU",
                    "## Generation with the weights in host memory"):
        assert heading in md, heading

    # --diagnose: the calibration part's profiles and the prune part's host-memory jobs (env.json carried over,
    # so only the two parts run)
    diag = tmp_path / "diagnose"
    diag.mkdir()
    shutil.copy(out / "env.json", diag / "env.json")
    res = _suite(diag, "--parts", "calibration,prune", "--diagnose")
    assert list(res["runner"]) == ["calibration", "prune"] and res["diagnose"] is True
    calib = res["parts"]["calibration"]
    assert calib["status"] == "done" and calib["diagnose"] is True and len(calib["rows"]) == 6
    assert calib["profile_plain"]["wall_s"] > 0 and calib["profile"]["wall_s"] > 0  # both, for the difference
    prune = {(r["method"], r["weights"]): r for r in res["parts"]["prune"]["rows"]}
    assert res["parts"]["prune"]["status"] == "done"
    assert set(prune) == {("shortgpt", "device"), ("streamline", "device"), ("dynamic-slicing", "device"),
                          ("shortgpt", "host"), ("streamline", "host")}
    for m in ("shortgpt", "streamline"):  # host weights, streamed: the same model comes out
        assert prune[m, "host"]["params"] == prune[m, "device"]["params"]
    assert prune["shortgpt", "host"]["ppl"]["pruned"] > 0 and "eval_pruned" in prune["shortgpt", "host"]["times"]
    assert "(--diagnose)" in (diag / "gpu_suite.md").read_text()


def test_default_parts_are_the_core_set(tmp_path: Path) -> None:
    """--parts omitted: the core set in its order; 'all': every part. A zero budget starts none of them."""
    assert gpu_suite.CORE == ("env", "tests", "decode", "decode-baselines", "calibration", "serve", "decode-compile")
    for args, want in (((), list(gpu_suite.CORE)), (("--parts", "all"), list(gpu_suite.PARTS)),
                       (("--parts", "kernels,decode"), ["env", "kernels", "decode"])):
        res = _suite(tmp_path / "_".join(args or ("default",)).replace(",", "-"), "--budget-s", "0", *args,
                     timeout=120)
        assert list(res["runner"]) == want and {v["status"] for v in res["runner"].values()} == {"skipped"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--out", str(tmp_path / "x"),
                        "--parts", "env,nope"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "unknown parts ['nope']" in r.stderr


def test_tests_shards_balance_files_and_merge() -> None:
    ids = [f"tests/{f}.py::t{i}" for f, n in (("a", 5), ("b", 3), ("c", 2), ("d", 2), ("e", 1)) for i in range(n)]
    shards = suite_parts.shard_tests(ids, 2)  # dealt in turn: every file split between the shards
    assert shards == [ids[0::2], ids[1::2]]
    assert [len(s) for s in suite_parts.shard_tests(ids, 4)] == [4, 3, 3, 3]
    assert sorted(x for s in suite_parts.shard_tests(ids, 4) for x in s) == sorted(ids)  # none lost or repeated
    heavy = ids[5:8]  # tests/b.py's three tests land in three different shards
    assert sum(any(h in s for h in heavy) for s in suite_parts.shard_tests(ids, 4)) == 3
    one = ids[:5]
    assert suite_parts.shard_tests(one, 8) == [[x] for x in one] and suite_parts.shard_tests([], 4) == []

    def shard(rc: Any, summary: str, lines: list[str]) -> dict[str, Any]:
        return suite_parts._shard_result([*lines, summary], rc, 3, ["tests/a.py"], 1.5)

    a = shard(0, "3 passed, 1 skipped in 2.01s", ["SKIPPED [1] tests/a.py:3: no cuda"])
    b = shard(1, "1 failed, 2 passed, 2 errors in 3.50s", ["FAILED tests/b.py::t0 - assert 0", "ERROR tests/b.py::t1"])
    c = shard("timeout", "", ["....."])
    assert b["summary"] == "1 failed, 2 passed, 2 errors in 3.50s"
    assert a["skipped"] == ["SKIPPED [1] tests/a.py:3: no cuda"]
    rec = suite_parts.merge_shards([a, b], 9.04, ["ERROR tests/z.py"])
    assert rec["counts"] == {"passed": 5, "skipped": 1, "failed": 1, "error": 3}
    assert rec["summary"] == "1 failed, 5 passed, 1 skipped, 3 errors in 9.0s (2 shards)"
    assert rec["returncode"] == 1 and rec["status"] == "failed"
    assert rec["failures"] == ["ERROR tests/z.py", "FAILED tests/b.py::t0 - assert 0", "ERROR tests/b.py::t1"]
    assert rec["skipped"] == a["skipped"] and [s["returncode"] for s in rec["shards"]] == [0, 1]
    assert rec["tail"][0].startswith("--- shard 0: 3 tests, returncode 0") and len(rec["tail"]) == 2 + 2 + 3
    ok = suite_parts.merge_shards([a, a], 4.0)
    assert ok["returncode"] == 0 and ok["status"] == "done"
    assert ok["summary"] == "6 passed, 2 skipped in 4.0s (2 shards)"
    late = suite_parts.merge_shards([a, c], 4.0)  # a shard stopped at the part's limit fails the part
    assert late["returncode"] == "timeout" and late["status"] == "failed"


def test_markdown_lists_the_runtime_picks() -> None:
    row = {"model": "dense", "engine": "layerfold", "batch": 16, "decode_tok_s": 3000.0, "pct_of_bound": 70.0,
           "ttft_ms": 20.0, "peak_mem_bytes": 15e9}
    res = {"tiny": False, "seconds": 1.0, "runner": {}, "parts": {"decode": {"rows": [
        {**row, "picks": {"cublas": 64, "attn:dot": 32}}, {**row, "batch": 1}]}}}
    md = gpu_suite.markdown(res)
    assert "- picks, dense layerfold batch 16: cublas x64, attn:dot x32" in md
    assert "batch 1:" not in md  # a row without picks gets no line


def test_a_part_is_not_started_without_the_time_it_needs() -> None:
    """On a GPU, torch.compile's part is skipped with the reason when less than its compile time is left
    (rather than stopped at its limit with nothing); other parts start with 10 s; --tiny ignores NEEDS."""
    import gpu_suite

    need = gpu_suite.NEEDS["decode-compile"]
    assert need > 100
    assert gpu_suite.skip_reason("decode-compile", need, 600, tiny=False) is None
    why = gpu_suite.skip_reason("decode-compile", need - 1, 600, tiny=False)
    assert why and f"needs at least {need:.0f} s" in why
    assert gpu_suite.skip_reason("decode", 11, 600, tiny=False) is None
    assert "was spent" in gpu_suite.skip_reason("decode", 9, 600, tiny=False)
    assert gpu_suite.skip_reason("decode-compile", 11, 600, tiny=True) is None
