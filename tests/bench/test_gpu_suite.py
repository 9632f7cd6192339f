"""bench/gpu_suite.py --tiny: every part of the GPU suite runs on this CPU (tiny model, kernels in the Triton
interpreter), so the suite cannot rot between GPU runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_suite_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    status = {name: part["status"] for name, part in res["parts"].items()}
    assert status.pop("decode-compile") == "skipped"  # compiling takes minutes on a CPU; the GPU run measures it
    assert status == {name: "done" for name in status}, status
    assert set(status) >= {"env", "tests", "decode", "decode-baselines", "decode-sdpa", "kernels", "calibration",
                           "serve", "calibration-big", "prune", "heal", "host-generate"}
    sdpa = res["parts"]["decode-sdpa"]["rows"]  # the attention A/B: the same step with each decode attention
    assert {r["engine"] for r in sdpa} == {f"layerfold-{a}-attn" for a in ("kernel", "sdpa", "early", "dot",
                                                                          "kernel-again")}
    assert all(r["decode_tok_s"] > 0 for r in sdpa)
    assert "layerfold-sdpa-attn" in (out / "gpu_suite.md").read_text()
    s = res["decode_summary"]
    assert set(s["pruned"]) == {"shortgpt", "streamline", "dynamic-slicing", "come"}
    for by_batch in s["pruned"].values():  # a pruned shape reads fewer bytes per step than the dense one
        assert all(v["predicted"] > 1 and v["speedup"] > 0 for v in by_batch.values())
    assert all(v["best_torch"] == "torch-eager" and v["vs_hf"] > 0 for v in s["batches"].values())
    calib = {r["config"]: r for r in res["parts"]["calibration"]["rows"]}
    assert set(calib) == {"plain", "default", "default+grams", "window only", "cka only", "channels only"}
    assert calib["plain"]["over_plain"] == 1.0 and res["parts"]["calibration"]["warmup_s"] > 0
    assert res["parts"]["calibration"]["profile_plain"]["wall_s"] > 0  # both profiles, for the difference
    serve = res["parts"]["serve"]["rows"]
    assert [(r["clients"], r["sampling"]) for r in serve] == [(1, "greedy"), (2, "greedy"), (2, "shaped")]
    assert all(r["tokens_s"] > 0 for r in serve)
    prune = {(r["method"], r["weights"]): r for r in res["parts"]["prune"]["rows"]}  # the whole pipeline
    assert set(prune) == {("shortgpt", "device"), ("streamline", "device"), ("dynamic-slicing", "device"),
                          ("shortgpt", "host"), ("streamline", "host")}
    assert prune["shortgpt", "device"]["layers"] == prune["streamline", "device"]["layers"] - 1 == 3
    assert all(r["params_ratio"] < 1 and {"load", "calibrate", "method", "save"} <= set(r["times"])
               for r in prune.values())
    for m in ("shortgpt", "streamline"):  # host weights, streamed: the same model comes out
        assert prune[m, "host"]["params"] == prune[m, "device"]["params"]
    assert prune["shortgpt", "host"]["ppl"]["pruned"] > 0 and "eval_pruned" in prune["shortgpt", "host"]["times"]
    heal = {r["config"]: r for r in res["parts"]["heal"]["rows"]}
    assert heal["changed layers only"]["global_params"] == "changed"
    assert heal["teacher in host memory"]["teacher"] == "host" and heal["default"]["teacher"] == "device"
    for r in heal.values():  # both stages ran and report their rate; the student is back in its own dtype
        assert set(r["tokens_s"]) == {"layer", "global"} and min(r["tokens_s"].values()) > 0, r
        assert r["dtypes_after"] == ["torch.float32"]
    gen = res["parts"]["host-generate"]["rows"]  # generation with the weights streamed from host memory
    assert [r["batch"] for r in gen] == [1, 2] and all(r["tok_s"] > 0 and r["pct_of_bound"] > 0 for r in gen)
    md = (out / "gpu_suite.md").read_text()
    pick = re.search(r"- attention, 2 rows: default .* fastest variant `layerfold s16 (\w+) x(\w+)`", md)
    assert pick and pick[1] in ("plain", "early", "dot") and pick[2] in ("1", "2"), md[-3000:]  # the sweep's pick
    for heading in ("## Decode", "## Calibration kernels", "## Decode kernels", "## Serving", "## Big calibrations",
                    "## layerfold prune on the GPU", "## layerfold heal on the GPU",
                    "## Generation with the weights in host memory"):
        assert heading in md, heading
