"""The parts of bench/gpu_suite.py. Each runs in its own process, writes ``OUT/<part>.json`` as it goes
(so a part stopped at its time limit keeps what it measured), and returns nothing.

A part receives ``tiny``: the same code on CPU with a tiny model (kernels in the Triton interpreter),
so the suite is exercised by the test suite between GPU runs. The driver's ``--diagnose`` reaches a part
as GPU_SUITE_DIAGNOSE=1 (``diagnose()``: the calibration part's profiles, the prune part's host-memory
jobs), and its time limit as GPU_SUITE_LIMIT_S (the tests part stops its shards before it).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkout  # noqa: F401  (layerfold from this checkout when it is not installed)
import torch

ROOT = Path(__file__).resolve().parents[1]


def diagnose() -> bool:
    """The suite runs with --diagnose: the parts' diagnostics (profiles, extra jobs) on top of the timings."""
    return os.environ.get("GPU_SUITE_DIAGNOSE") == "1"


class Recorder:
    """The part's results, rewritten to OUT/<part>.json at every ``save``."""

    def __init__(self, out: Path, part: str, tiny: bool):
        self.path = out / f"{part}.json"
        self.data: dict[str, Any] = {"part": part, "tiny": tiny, "diagnose": diagnose(), "status": "running",
                                     "started": time.time()}
        self.save()

    def save(self, **kw: Any) -> None:
        self.data.update(kw)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return repr(x)


def device(tiny: bool) -> torch.device:
    return torch.device("cpu" if tiny else "cuda")


def tiny_dense():
    from layerfold.core.spec import LayerSpec, ModelSpec

    layer = LayerSpec(64, 64, 64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=128)
    return ModelSpec(vocab_size=256, d_model=64, layers=(layer,) * 4, max_position=512, bos_token_id=1,
                     eos_token_ids=(2,))


def dense_spec(tiny: bool):
    from layerfold.evaluation.shapes import llama7b_spec

    return tiny_dense() if tiny else llama7b_spec()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- env: the card, and the ceilings every part divides by -------------------------------------------------
def part_env(rec: Recorder, tiny: bool) -> None:
    from layerfold.evaluation.measure import measure_bandwidth

    dev = device(tiny)
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 1e9, 1))
    rec.save(info=info)
    bw = measure_bandwidth(dev, torch.bfloat16, min_s=0.3 if not tiny else 0.05)
    rec.save(bandwidth_gbs=bw["bandwidth_gbs"], bandwidth=bw)
    n = 8192 if not tiny else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _time(lambda: a @ b, dev, reps=10 if not tiny else 2)
    rec.save(matmul_tflops=2 * n ** 3 / t / 1e12)
    if dev.type == "cuda":  # host -> device from pinned and from pageable memory (calibration's bound)
        host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
        dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        t = _time(lambda: dst.copy_(host, non_blocking=True), dev, reps=5)
        rec.save(h2d_pinned_gbs=(1 << 30) / t / 1e9)
        page = torch.empty(1 << 28, dtype=torch.uint8)
        t = _time(lambda: dst[: 1 << 28].copy_(page), dev, reps=3)
        rec.save(h2d_pageable_gbs=(1 << 28) / t / 1e9)
    rec.save(status="done")


def _time(fn, dev: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` (synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- tests: the gpu-marked tests, in concurrent shards -------------------------------------------------------
def _pytest(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "checkout.py"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def shard_tests(node_ids: list[str], k: int) -> list[list[str]]:
    """``node_ids`` dealt round-robin, in the collected order, into at most ``k`` shards of node ids: each
    shard takes about a k-th of every file. Files differ in cost per test far more than tests within a file
    do (GPU run 4: the decode, runtime and healing files' 19 tests took 77 s in one shard, the kernel
    files' 58 took 13-16 s in each of three, when whole files were balanced by test count), so the
    shards now share every file's cost. None is empty."""
    shards: list[list[str]] = [[] for _ in range(min(k, len(node_ids)))]
    for i, n in enumerate(node_ids):
        shards[i % len(shards)].append(n)
    return shards


_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")


def pytest_counts(summary: str) -> dict[str, int]:
    """passed / failed / skipped / error (/ xfailed / xpassed) of a pytest summary line."""
    out: dict[str, int] = {}
    for n, kind in _COUNTS.findall(summary):
        kind = "error" if kind.startswith("error") else kind
        out[kind] = out.get(kind, 0) + int(n)
    return out


def merge_shards(shards: list[dict[str, Any]], seconds: float,
                 extra_failures: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The tests part's one record from its shards' (each: returncode, summary, failures, skipped, tail,
    seconds): counts summed into one summary line, failures and skip reasons concatenated, the tails one
    after another under a header per shard. ``extra_failures``: collection errors, counted as errors."""
    counts: dict[str, int] = {}
    for sh in shards:
        for kind, n in pytest_counts(sh["summary"]).items():
            counts[kind] = counts.get(kind, 0) + n
    if extra_failures:
        counts["error"] = counts.get("error", 0) + len(extra_failures)
    order = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")
    words = [f"{counts[k]} {'errors' if k == 'error' and counts[k] > 1 else k}" for k in order if counts.get(k)]
    summary = f"{', '.join(words) or 'no tests ran'} in {seconds:.1f}s ({len(shards)} shards)"
    rcs = [sh["returncode"] for sh in shards]
    rc = next((r for r in rcs if r != 0), 1 if extra_failures else 0)
    tail: list[str] = []
    for i, sh in enumerate(shards):
        tail += [f"--- shard {i}: {sh['tests']} tests, returncode {sh['returncode']}, {sh['seconds']:.1f} s"]
        tail += sh["tail"][-15:]
    return {"returncode": rc, "summary": summary, "counts": counts,
            "failures": (list(extra_failures) + [f for sh in shards for f in sh["failures"]])[:40],
            "skipped": [x for sh in shards for x in sh["skipped"]][:40], "seconds": seconds, "tail": tail,
            "status": "done" if rc == 0 else "failed",
            "shards": [{k: sh[k] for k in ("tests", "args", "returncode", "seconds", "summary")} for sh in shards]}


def _shard_result(lines: list[str], rc: Any, tests: int, args: list[str], seconds: float) -> dict[str, Any]:
    summary = next((l for l in reversed(lines) if re.search(r" (passed|failed|errors?|skipped)\b|no tests ran", l)),
                   "")
    return {"returncode": rc, "summary": summary, "tests": tests, "args": args, "seconds": round(seconds, 1),
            "failures": [l for l in lines if l.startswith(("FAILED", "ERROR"))],
            "skipped": [l for l in lines if l.startswith("SKIPPED")],  # with their reasons
            "tail": lines[-30:]}


def part_tests(rec: Recorder, tiny: bool) -> None:
    """The `gpu`-marked tests (tiny: a few interpreter kernel tests, to exercise the plumbing), collected once
    and run as K concurrent pytest processes (they are compile-bound and independent; K = cpu_count // 4, at
    most 4; tiny: 2), each a balanced share (``shard_tests``); one merged record, with ``shards``."""
    sel = ["-m", "gpu"] if not tiny else ["-k", "dispatch and not fast_cpu"]
    where = ["tests"] if not tiny else ["tests/kernels"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or tiny}
    limit = float(os.environ.get("GPU_SUITE_LIMIT_S") or 0)
    t0 = time.perf_counter()
    deadline = t0 + limit - 10 if limit else None  # stop the shards before the driver kills this process
    r = subprocess.run(_pytest("--collect-only", "--continue-on-collection-errors", *sel, *where), cwd=ROOT,
                       capture_output=True, text=True, env=env, check=False)
    lines = (r.stdout + r.stderr).splitlines()
    head = lines[:next((i for i, l in enumerate(lines) if l.startswith("=")), len(lines))]  # before ERRORS etc.
    ids = list(dict.fromkeys(l.rstrip() for l in head if re.match(r"[\w./-]+\.py::", l)))
    collect_errors = [l for l in lines if l.startswith("ERROR")]
    k = 2 if tiny else min(4, max(1, (os.cpu_count() or 1) // 4))
    shards = shard_tests(ids, k)
    rec.save(collected=len(ids), collect_s=time.perf_counter() - t0, collect_errors=collect_errors[:20],
             shard_count=len(shards))
    # the slowest tests' times in each shard's log: what the next balancing can go by
    opts = ["-x" if tiny else "-rfEs", "--durations=8", "--continue-on-collection-errors", *sel]
    logs, procs = [], []
    t1 = time.perf_counter()
    for i, args in enumerate(shards):
        logs.append(open(rec.path.parent / f"tests-shard{i}.log", "w+"))  # noqa: SIM115 (closed below)
        procs.append(subprocess.Popen(_pytest(*opts, *args), cwd=ROOT, env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, text=True))
    ntests = [sum(1 for n in ids if any(n == a or n.startswith(a + "::") for a in sh)) for sh in shards]
    done: dict[int, dict[str, Any]] = {}
    try:
        while len(done) < len(procs):
            for i, p in enumerate(procs):
                if i in done:
                    continue
                rc = p.poll()
                if rc is None and deadline is not None and time.perf_counter() > deadline:
                    p.kill()
                    p.wait()
                    rc = "timeout"
                if rc is None:
                    continue
                logs[i].seek(0)
                out = logs[i].read().strip().splitlines()
                done[i] = _shard_result(out, rc, ntests[i], shards[i], time.perf_counter() - t1)
                ordered = [done[j] for j in sorted(done)]
                rec.save(**merge_shards(ordered, time.perf_counter() - t0, collect_errors))
                if len(done) < len(procs):
                    rec.save(status="running")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    res = merge_shards([done[i] for i in sorted(done)], time.perf_counter() - t0, collect_errors)
    if not ids:
        res.update(status="failed" if collect_errors or r.returncode not in (0, 5) else "done",
                   tail=lines[-30:], returncode=r.returncode)
    rec.save(**res)


# ---- decode: dense and pruned shapes, against torch eager / compile / HF ------------------------------------
def _decode_kw(tiny: bool) -> dict[str, Any]:
    return dict(new_tokens=4 if tiny else 128, prompt_len=8 if tiny else 128, repeats=1 if tiny else 3,
                device=device(tiny), dtype=torch.float32 if tiny else torch.bfloat16, compile=False,
                kernels="triton" if tiny else None)


def _bench_one(spec, name: str, engines: list[str], batches: list[int], tiny: bool,
               repeats: int | None = None, new_tokens: int | None = None,
               prompt_len: int | None = None, on_built: Callable[[], None] | None = None) -> dict[str, Any]:
    from layerfold.evaluation.benchmark import bench_models
    from layerfold.evaluation.shapes import random_model

    kw = _decode_kw(tiny)
    if repeats is not None:
        kw["repeats"] = repeats
    if new_tokens is not None:
        kw["new_tokens"] = new_tokens
    if prompt_len is not None:
        kw["prompt_len"] = prompt_len
    m = random_model(spec, kw["device"], kw["dtype"])
    m.source = name
    try:
        return bench_models([m], engines=engines, batch_sizes=batches, on_built=on_built, **kw)
    finally:
        del m
        free()


def decode_shapes(tiny: bool) -> dict[str, Any]:
    from layerfold.evaluation.shapes import pruned_shapes

    dense = dense_spec(tiny)
    return {"dense": dense, **pruned_shapes(dense, removed=1 if tiny else None, round_to=8 if tiny else 128)}


def part_decode(rec: Recorder, tiny: bool) -> None:
    """layerfold on the dense 7B shape and every pruned shape."""
    batches = [1, 2] if tiny else [1, 16, 64]
    _decode_jobs(rec, tiny, [(name, spec, ["layerfold"], batches, None) for name, spec in decode_shapes(tiny).items()])


def part_decode_baselines(rec: Recorder, tiny: bool) -> None:
    """torch eager and HF eager generate on the dense shape (HF at the two smaller batches, one timed run:
    it is 7-10x off the step, a reference, not a target, and its batch-1 run alone took about 6 s in
    GPU run 4)."""
    batches = [1, 2] if tiny else [1, 16, 64]
    dense = dense_spec(tiny)
    _decode_jobs(rec, tiny, [("dense", dense, ["torch-eager"], batches, None),
                             ("dense", dense, ["hf"], batches[:2], 1)])


# the decode attentions the decode-sdpa part runs end to end, in this order (LAYERFOLD_DECODE_ATTN; "+pdl":
# with LAYERFOLD_PDL=1 too, the step's Triton kernels under programmatic dependent launch; "+normoff": with
# LAYERFOLD_NORM_GEMV=off, no norm fused into a GEMV, against auto's timed choice)
DECODE_ATTNS = ("auto", "auto+pdl", "auto+normoff", "kernel", "early", "dot", "sdpa")
_VARIANT_ENV = {"pdl": ("LAYERFOLD_PDL", "1"), "normoff": ("LAYERFOLD_NORM_GEMV", "off")}


def part_decode_sdpa(rec: Recorder, tiny: bool) -> None:
    """The end-to-end A/B of the decode attention: layerfold on the dense shape under each
    LAYERFOLD_DECODE_ATTN of DECODE_ATTNS, one after another in this process, engine
    ``layerfold-<name>-attn``: ``auto`` (the runtime times its kernel forms per batch bucket when it builds
    that bucket's CUDA graph and keeps the fastest; its rows carry the picks), ``kernel`` (the kernel over
    each row's own slots), its two prepared loop forms ``early`` and ``dot``, and ``sdpa`` (torch's SDPA over
    the whole static cache with a length mask; kernels.attn_decode.attn_decode_sdpa); ``auto+pdl`` is
    ``auto`` with LAYERFOLD_PDL=1 (kernels._dispatch.pdl), right after it for a paired look, and
    ``auto+normoff`` is ``auto`` with LAYERFOLD_NORM_GEMV=off (no input norm fused into its GEMV). An untimed warm-up
    of the same model, batches and cache length (the runtime's default attention, 8 new tokens after a longer
    prompt, results discarded) runs
    first: run 3's first model in this process measured 12% under its own decode row."""
    batches = [1, 2] if tiny else [1, 16, 64]
    dense, kw = dense_spec(tiny), _decode_kw(tiny)
    os.environ.pop("LAYERFOLD_DECODE_ATTN", None)
    t = time.perf_counter()
    try:
        w = min(8, kw["new_tokens"])  # the same cache length (prompt + new tokens), so the same kernel launches
        _bench_one(dense, "dense", ["layerfold"], batches, tiny, repeats=1, new_tokens=w,
                   prompt_len=kw["prompt_len"] + kw["new_tokens"] - w)
        rec.save(warmup_s=time.perf_counter() - t)
    except Exception as e:  # the rows below still run (each is noted if it fails the same way)
        rec.save(warmup_s=time.perf_counter() - t, warmup_error=f"{type(e).__name__}: {str(e)[:300]}")
    _decode_jobs(rec, tiny, [("dense", dense, ["layerfold"], batches, None, attn, f"layerfold-{attn}-attn")
                             for attn in DECODE_ATTNS])


def _decode_jobs(rec: Recorder, tiny: bool, jobs: list[tuple]) -> None:
    """Each job: (model name, spec, engines, batch sizes, repeats[, LAYERFOLD_DECODE_ATTN, engine label])."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    setup: dict[str, float] = {}
    for name, spec, engines, bs, reps, *alt in jobs:
        attn, engine = alt if alt else (None, None)
        if attn is not None:  # read when the fused step is built (PDL: when its graphs are), so per job here
            base, *flags = attn.split("+")
            os.environ["LAYERFOLD_DECODE_ATTN"] = base
            for flag, (var, value) in _VARIANT_ENV.items():
                if flag in flags:
                    os.environ[var] = value
                else:
                    os.environ.pop(var, None)
        label = engine or engines[0]
        t = time.perf_counter()
        try:
            res = _bench_one(spec, name, engines, bs, tiny, reps)
        except Exception as e:  # one engine failing must not lose the others
            notes.append(f"{name} {label}: failed: {type(e).__name__}: {str(e)[:300]}")
            rec.save(rows=rows, notes=notes)
            continue
        for r in res["rows"]:
            r.pop("decode_runs", None)
            r["engine"] = engine or r["engine"]
        rows += res["rows"]
        notes += res["notes"]
        setup.update({f"{k} ({label})": v for k, v in res["setup_s"].items()})
        rec.save(rows=rows, notes=notes, setup_s=setup, bandwidth=res["bandwidth"],
                 device_name=res["device_name"], dtype=res["dtype"], new_tokens=res["new_tokens"],
                 prompt_len=res["prompt_len"], repeats=res["repeats"],
                 seconds={**rec.data.get("seconds", {}), f"{name} {label}": time.perf_counter() - t})
    rec.save(status="done")


def part_decode_compile(rec: Recorder, tiny: bool) -> None:
    """torch.compile of the runtime's torch step on the dense shape (its compile time apart).

    Where the runner starts this part beside the gpu tests (GPU_SUITE_HOLD names a file), the compile runs
    while they do, and the part waits, compiled and idle, until the runner creates that file once the
    tests have ended; only then are the decode runs timed, with nothing else on the device. The compile is
    CPU work (dynamo, inductor) that would otherwise add about 100 s to the suite. In --tiny mode torch eager
    stands in for the compile (compiling takes minutes on a CPU), so the hold is exercised; its rows are
    kept apart (``stand_in_rows``) and in no summary."""
    batches = [1, 2] if tiny else [1, 16, 64]
    hold = os.environ.get("GPU_SUITE_HOLD")
    t = time.perf_counter()

    def built() -> None:  # the engine is compiled: wait for the runner's word before the timed runs
        if not hold:
            return
        rec.save(built_s=time.perf_counter() - t)
        th, cap = time.perf_counter(), float(os.environ.get("GPU_SUITE_LIMIT_S", "600"))
        while not Path(hold).exists() and time.perf_counter() - t < cap:
            time.sleep(0.2)
        rec.save(held_s=time.perf_counter() - th)

    engine = "torch-eager" if tiny else "torch-compile"
    res = _bench_one(dense_spec(tiny), "dense", [engine], batches, tiny, on_built=built)
    rows = res["rows"]
    for r in rows:
        r.pop("decode_runs", None)
    rec.save(**{"stand_in_rows" if tiny else "rows": rows}, notes=res["notes"], setup_s=res["setup_s"],
             bandwidth=res["bandwidth"], seconds=time.perf_counter() - t, status="done", dynamo=_dynamo_stats(),
             overlapped=bool(hold), **({"stand_in": "torch eager (tiny mode)"} if tiny else {}))


def _dynamo_stats() -> dict[str, Any]:
    """What torch.compile compiled in this process: graphs, recompilations and its own phase times (run 4's
    part took 182 s, of which 103 s was the runtime's compile at construction; the rest is unaccounted)."""
    try:
        from torch._dynamo.utils import compile_times, counters

        return {"counters": {k: dict(v) for k, v in counters.items() if v},
                "compile_times": compile_times(repr="str", aggregate=True)}
    except Exception as e:  # private API: its absence must not lose the part's rows
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def decode_summary(parts: dict[str, Any]) -> dict[str, Any]:
    """Per batch: layerfold's % of bound and its ratio to the better torch engine; per pruned shape: the
    measured speedup over dense against the bytes-per-step prediction."""
    rows = [r for p in ("decode", "decode-baselines", "decode-compile") for r in (parts.get(p) or {}).get("rows", [])]
    get = lambda model, eng, b: next((r for r in rows if (r["model"], r["engine"], r["batch"]) == (model, eng, b)),
                                     None)
    out: dict[str, Any] = {"batches": {}, "pruned": {}}
    for b in sorted({r["batch"] for r in rows}):
        lf = get("dense", "layerfold", b)
        if lf is None:
            continue
        base = [x for x in (get("dense", "torch-eager", b), get("dense", "torch-compile", b)) if x is not None]
        best = max(base, key=lambda r: r["decode_tok_s"]) if base else None
        hf = get("dense", "hf", b)
        out["batches"][b] = {"layerfold_tok_s": lf["decode_tok_s"], "pct_of_bound": lf["pct_of_bound"],
                             "vs_best_torch": lf["decode_tok_s"] / best["decode_tok_s"] if best else None,
                             "best_torch": best["engine"] if best else None,
                             "vs_hf": lf["decode_tok_s"] / hf["decode_tok_s"] if hf else None}
        for r in rows:
            if r["engine"] == "layerfold" and r["batch"] == b and r["model"] != "dense":
                pred = lf["step_bytes"] / r["step_bytes"]
                sp = r["decode_tok_s"] / lf["decode_tok_s"]
                out["pruned"].setdefault(r["model"], {})[b] = {
                    "speedup": sp, "predicted": pred, "speedup_over_predicted": sp / pred,
                    "gain_over_predicted_gain": (sp - 1) / (pred - 1) if pred > 1 else None,
                    "pct_of_bound": r["pct_of_bound"]}
    return out


# ---- kernels: each kernel against the roofline it belongs to ------------------------------------------------
def _bench_ms(fn, dev: torch.device, tiny: bool) -> float:
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))
    return 1e3 * _time(fn, dev, reps=1)


def part_kernels(rec: Recorder, tiny: bool) -> None:
    """Calibration kernels at the 7B shapes (bench/bench_kernels.py's cases), the decode kernels, and GEMV
    cost against the rounding multiple of a pruned width."""
    import argparse

    import bench_kernels

    dev = device(tiny)
    env = _env_ceilings(rec)
    args = argparse.Namespace(tokens=256 if tiny else 16384, hidden=64 if tiny else 4096, ffn=96 if tiny else 11008,
                              window=8, cka_tokens=32 if tiny else 256, layers=5 if tiny else 33, dtype="bf16")
    rows = []
    for case in bench_kernels.build_cases(args, dev):
        for impl, fn in (("triton", case.run), ("torch_ref", case.ref)):
            try:
                ms = _bench_ms(fn, dev, tiny)
            except Exception as e:
                rows.append({"kernel": case.name, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            gbs = case.bytes_read / ms / 1e6
            tfl = case.flops / ms / 1e9 if case.flops else None
            rows.append({"kernel": case.name, "impl": impl, "shape": case.shape, "ms": ms, "gb_s": gbs,
                         "pct_bw": 100 * gbs / env["bw"], "tflops": tfl,
                         "pct_matmul": 100 * tfl / env["tflops"] if tfl else None})
        rec.save(calibration_kernels=rows)
    rec.save(channel_variants=_channel_variants(dev, tiny, env, args))
    rec.save(decode_kernels=_decode_kernels(dev, tiny, env))
    rec.save(widths=_width_sweep(dev, tiny, env), status="done")


def _channel_variants(dev: torch.device, tiny: bool, env: dict[str, float], args: Any) -> list[dict[str, Any]]:
    """The channel-statistics kernels under each launch variant of heuristics.CHANNEL_VARIANTS."""
    from layerfold import kernels
    from layerfold.kernels import heuristics

    n, c = args.tokens, args.ffn
    g = torch.Generator(device=dev).manual_seed(0)
    gate = torch.randn(n, c, generator=g, device=dev).to(torch.bfloat16)
    up = torch.randn(n, c, generator=g, device=dev).to(torch.bfloat16)
    mask = torch.rand(n, generator=g, device=dev) < 0.9
    keep, out = heuristics.CHANNEL_STATS, []
    try:
        for v in heuristics.CHANNEL_VARIANTS:
            heuristics.CHANNEL_STATS = v
            for name, fn, nbytes in (("channel_stats", lambda: kernels.channel_stats(gate, mask), n * c * 2 + n),
                                     ("swiglu_channel_stats", lambda: kernels.swiglu_channel_stats(gate, up, mask),
                                      2 * n * c * 2 + n)):
                ms = _bench_ms(fn, dev, tiny)
                out.append({"kernel": name, "config": str(v), "ms": ms, "gb_s": nbytes / ms / 1e6,
                            "pct_bw": 100 * nbytes / ms / 1e6 / env["bw"]})
    finally:
        heuristics.CHANNEL_STATS = keep
    return out


def _env_ceilings(rec: Recorder) -> dict[str, float]:
    env = json.loads((rec.path.parent / "env.json").read_text()) if (rec.path.parent / "env.json").exists() else {}
    return {"bw": env.get("bandwidth_gbs") or 1.0, "tflops": env.get("matmul_tflops") or 1.0}


def _decode_kernels(dev: torch.device, tiny: bool, env: dict[str, float]) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from layerfold.kernels.attn_decode import attn_decode
    from layerfold.kernels.gemv import gemv
    from layerfold.kernels.heuristics import GEMV_CONFIGS
    from layerfold.kernels.rmsnorm import add_rmsnorm
    from layerfold.kernels.rope_cache import rope_cache

    dt = torch.bfloat16
    d, ffn, v = (64, 96, 256) if tiny else (4096, 11008, 32000)
    out: list[dict[str, Any]] = []
    shapes = {"qkv": (3 * d, d), "o": (d, d), "gate_up": (2 * ffn, d), "down": (d, ffn), "head": (v, d)}
    for rows in (1, 4):
        for name, (o, k) in shapes.items():
            w = torch.randn(o, k, device=dev, dtype=dt) * 0.02
            x = torch.randn(rows, k, device=dev, dtype=dt)
            nbytes = o * k * 2
            cands = [("cublas", lambda x=x, w=w: F.linear(x, w))]
            cands += [(c.name, lambda c=c, x=x, w=w: gemv(x, w, config=c)) for c in (GEMV_CONFIGS if not tiny else [])]
            for impl, fn in cands:
                try:
                    ms = _bench_ms(fn, dev, tiny)
                except Exception as e:
                    out.append({"kernel": f"gemv {name}", "rows": rows, "impl": impl, "error": str(e)[:200]})
                    continue
                out.append({"kernel": f"gemv {name}", "rows": rows, "impl": impl, "shape": f"{o}x{k}", "ms": ms,
                            "gb_s": nbytes / ms / 1e6, "pct_bw": 100 * nbytes / ms / 1e6 / env["bw"]})
    nh, hd = (4, 16) if tiny else (32, 128)
    for b, ctx, smax in ((1, 4096, 4096), (16, 256, 256), (64, 256, 256)) if not tiny else ((1, 40, 48), (2, 20, 48)):
        k = torch.randn(b, nh, smax, hd, device=dev, dtype=dt)
        vv = torch.randn_like(k)
        q = torch.randn(b, nh, 1, hd, device=dev, dtype=dt)
        lengths = torch.full((b,), ctx, device=dev, dtype=torch.long)
        nbytes = 2 * b * nh * ctx * hd * 2
        a = (q, k, vv, lengths)
        cands = [("layerfold", lambda a=a: attn_decode(*a)),
                 ("layerfold-1split", lambda a=a: attn_decode(*a, splits=1)),
                 ("sdpa", lambda a=a, c=ctx: F.scaled_dot_product_attention(a[0], a[1][:, :, :c], a[2][:, :, :c]))]
        # what the runtime would have to run instead of its kernel: SDPA over the whole static cache with a
        # per-row length mask (static shapes for the CUDA graph); against "sdpa", the mask's cost
        am = (torch.arange(smax, device=dev)[None, :] < lengths[:, None])[:, None, None]
        cands.append(("sdpa-masked", lambda a=a, am=am: F.scaled_dot_product_attention(a[0], a[1], a[2],
                                                                                        attn_mask=am)))
        # the batched rows ran at 50% of the bandwidth in runs 2 and 3 (batch 1 at 24%): tiles, the loop's form
        # (plain; the values' load issued with the keys'; both products as tensor-core dots) and key-range
        # splits (more loads in flight); run 3 found the warps (8 slower) and the pipelining depth (no effect)
        forms = ("plain", "early", "dot")
        grid = [(16, f, sp) for f in forms for sp in (1, 2)] if tiny else [
            (bs, f, sp) for bs in (16, 32, 64) for f in forms for sp in ((1, 2, 4) if b > 1 else (None, 16, 64))]
        cands += [(f"layerfold s{bs} {f} x{sp or 'auto'}", lambda a=a, bs=bs, f=f, sp=sp:
                   attn_decode(*a, splits=sp, block_s=bs, kv_early=f == "early", dot=f == "dot"))
                  for bs, f, sp in grid]
        ref = attn_decode(*a).float()
        for impl, fn in cands:
            try:
                ms = _bench_ms(fn, dev, tiny)
                err = float((fn().float() - ref).abs().max()) if impl.startswith("layerfold ") else None
            except Exception as e:  # a variant that does not compile (shared memory) is a row, not a lost part
                out.append({"kernel": "attn_decode", "rows": b, "impl": impl, "error": str(e)[:200]})
                continue
            out.append({"kernel": "attn_decode", "rows": b, "impl": impl, "shape": f"ctx {ctx} of {smax}", "ms": ms,
                        "gb_s": nbytes / ms / 1e6, "pct_bw": 100 * nbytes / ms / 1e6 / env["bw"],
                        **({"max_diff_vs_default": err} if err is not None else {})})
    for rows in (1, 64):
        qkv = torch.randn(rows, 3 * d, device=dev, dtype=dt)
        cos = torch.randn(512, hd, device=dev, dtype=dt)
        kc = torch.zeros(rows, nh, 512, hd, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        pos = torch.arange(rows, device=dev) % 512
        a = (qkv, cos, cos, pos, kc, vc)
        ms = _bench_ms(lambda a=a: rope_cache(*a, n_heads=nh, n_kv=nh), dev, tiny)
        out.append({"kernel": "rope_cache", "rows": rows, "impl": "layerfold", "ms": ms})
        h = torch.randn(rows, d, device=dev, dtype=dt)
        y = torch.randn_like(h)
        wn = torch.ones(d, device=dev, dtype=dt)
        ms = _bench_ms(lambda a=(h, y, wn): add_rmsnorm(*a, 1e-5), dev, tiny)
        out.append({"kernel": "add_rmsnorm", "rows": rows, "impl": "layerfold", "ms": ms})
    return out


def _width_sweep(dev: torch.device, tiny: bool, env: dict[str, float]) -> list[dict[str, Any]]:
    """GEMV (cuBLAS and the best Triton config) for a down projection whose input width K is a multiple of
    8, 16, 32, 64 or 128 only: time per weight byte by the largest power of two dividing K."""
    import torch.nn.functional as F

    from layerfold.kernels.gemv import pick_linear

    dt = torch.bfloat16
    o = 64 if tiny else 4096
    base = 96 if tiny else 8192
    out = []
    for extra in ((0, 8, 16, 24, 32, 64) if tiny else (0, 8, 16, 24, 32, 48, 64, 96, 128)):
        k = base + extra
        w = torch.randn(o, k, device=dev, dtype=dt) * 0.02
        for rows in (1, 16):
            x = torch.randn(rows, k, device=dev, dtype=dt)
            fn, name = pick_linear(rows, w, with_res=False) if dev.type == "cuda" else (None, "cublas")
            cands = [("cublas", lambda x=x, w=w: F.linear(x, w))]
            if fn is not None:
                cands.append(("picked " + name, lambda x=x, w=w, fn=fn: fn(x, w, None, None)))
            for impl, f in cands:
                ms = _bench_ms(f, dev, tiny)
                out.append({"k": k, "multiple": k & -k, "rows": rows, "impl": impl, "ms": ms,
                            "gb_s": o * k * 2 / ms / 1e6, "pct_bw": 100 * o * k * 2 / ms / 1e6 / env["bw"]})
    return out


# ---- calibration: the streamed pass at the 7B shape -------------------------------------------------------
CALIB_CONFIGS = {"plain": dict(window=0, cka=False, channels=False),
                 "default": dict(),
                 "default+grams": dict(grams=True)}
# one statistic at a time over the plain loop: which of them the default's overhead comes from
CALIB_SINGLE = {"window only": dict(cka=False, channels=False),
                "cka only": dict(window=0, channels=False),
                "channels only": dict(window=0, cka=False)}


def host_model(spec, tiny: bool, dtype: torch.dtype = torch.bfloat16):
    """A random model of ``spec`` in host memory (initialised on the GPU where there is one: faster)."""
    from layerfold.evaluation.shapes import random_model

    m = random_model(spec, "cpu" if tiny else "cuda", dtype)
    return m.to("cpu") if not tiny else m


def part_calibration(rec: Recorder, tiny: bool) -> None:
    """calibrate() of the 7B shape (weights in host memory, one layer on the GPU at a time): the plain
    layer loop, the default statistics, and with Grams; tokens/s, the loop's bound, the device peak. With
    --diagnose (``diagnose()``) also where the time goes: the plain loop with the weights already on the
    device, the host synchronisations, and profiles of the plain loop and the default statistics."""
    from layerfold.calibration.calibrate import calibrate
    from layerfold.inference.decode_net import decode_weight_bytes

    dev = device(tiny)
    env = json.loads((rec.path.parent / "env.json").read_text()) if (rec.path.parent / "env.json").exists() else {}
    spec = dense_spec(tiny)
    model = host_model(spec, tiny)
    n, T, mb = (4, 64, 2) if tiny else (16, 2048, 4)
    ids = torch.randint(3, spec.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))
    tokens = n * T
    wbytes = decode_weight_bytes(spec, torch.bfloat16)
    hbytes = 2 * tokens * spec.d_model * 2 * spec.n_layers  # each layer's input to the device and output back
    flops = 2 * tokens * sum(p.numel() for n_, p in model.named_parameters() if n_.startswith("layers."))
    h2d = env.get("h2d_pinned_gbs") or 1.0
    bound = {"h2d_s": (wbytes + hbytes) / (h2d * 1e9), "flops_s": flops / ((env.get("matmul_tflops") or 1.0) * 1e12)}
    bound["bound_s"] = max(bound["h2d_s"], bound["flops_s"])
    rec.save(tokens=tokens, samples=n, seq_len=T, micro_batch=mb, bound=bound)
    # Warm-up: one micro-batch of every configuration, so that every kernel specialisation the timed runs
    # launch is compiled here. Runs 1 and 2 warmed up the plain loop only, so the default's first call
    # compiled the statistics' kernels inside its timing (its overhead was ~2.4 s in both runs while the
    # plain loop went from 2.56 to 0.89 s). The compiles are reported on their own.
    t = time.perf_counter()
    for cfg in (*CALIB_CONFIGS.values(), *CALIB_SINGLE.values()):
        calibrate(model, ids[:mb], micro_batch=mb, device=dev, **cfg)
    rec.save(warmup_s=time.perf_counter() - t)
    rows = []
    for name, cfg in {**CALIB_CONFIGS, **CALIB_SINGLE}.items():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        st = calibrate(model, ids, micro_batch=mb, device=dev, **cfg)
        wall = time.perf_counter() - t
        rows.append({"config": name, "wall_s": wall, "tokens_s": tokens / wall,
                     "device_peak_gb": st.meta.get("device_peak_bytes", 0) / 1e9,
                     "buffers": st.meta.get("buffers"), "buffer_bytes": st.meta.get("buffer_bytes"),
                     "pct_of_bound": 100 * bound["bound_s"] / wall})
        rec.save(rows=rows)
    plain = rows[0]["wall_s"]
    for r in rows:
        r["over_plain"] = r["wall_s"] / plain
    rec.save(rows=rows)
    if not diagnose():
        rec.save(status="done")
        return
    # where the time goes: the plain loop with every weight already on the device (no bus), and a profile
    # of the default statistics
    if dev.type == "cuda":
        gpu_model = model.to(dev)
        t = time.perf_counter()
        calibrate(gpu_model, ids, micro_batch=mb, device=dev, **CALIB_CONFIGS["plain"])
        rec.save(plain_weights_on_device_s=time.perf_counter() - t)
        model = gpu_model.to("cpu")
        del gpu_model
        free()
    if dev.type == "cuda":
        try:  # a diagnosis: its failure must not lose the profile below
            rec.save(host_syncs=_syncs(lambda: calibrate(model, ids[:2 * mb], micro_batch=mb, device=dev)))
        except Exception as e:
            rec.save(host_syncs={"error": f"{type(e).__name__}: {e}"[:300], "total": None, "by_line": {}})
    profiles = {}
    for name in ("plain", "default"):  # the default's extra device time is the difference of the two
        t = time.perf_counter()
        cfg = CALIB_CONFIGS[name]
        prof = _profile(lambda cfg=cfg: calibrate(model, ids, micro_batch=mb, device=dev, **cfg), dev)
        profiles[name] = {**prof, "wall_s": time.perf_counter() - t}
    rec.save(profile=profiles["default"], profile_plain=profiles["plain"], status="done")


def _syncs(fn) -> dict[str, Any]:
    """The host synchronisations of one call (torch.cuda.set_sync_debug_mode "warn"), counted per calling
    line of Python: where the statistics still wait for the device."""
    import warnings
    from collections import Counter

    where: Counter[str] = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {"total": sum(where.values()), "by_line": dict(where.most_common(12))}


def _profile(fn, dev: torch.device) -> dict[str, str]:
    """torch.profiler tables of one call: the top operators by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    ka = prof.key_averages()
    out = {"by_host": ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)}
    if dev.type == "cuda":
        out["by_device"] = ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=48)
        out["device_s"] = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                              for e in ka) / 1e6
    return out


# ---- serve: `layerfold serve`'s app with 1, 16 and 64 streaming clients -------------------------------------
def ensure_server_packages(out: Path) -> str:
    """fastapi and uvicorn importable (installed offline from ``.whl/`` when missing); returns a PYTHONPATH
    entry to add ("" when nothing was needed)."""
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "pydantic")):
        return ""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise RuntimeError("fastapi/uvicorn are missing and no wheels were brought in .whl/ (see bench/gpu_suite.py)")
    site = out.parent / "suite-site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"offline install of the server's wheels failed: {r.stderr[-500:]}")
    return str(site)


def part_serve(rec: Recorder, tiny: bool) -> None:
    import socket

    site = ensure_server_packages(rec.path.parent)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (site, os.environ.get("PYTHONPATH", "")) if x)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve-worker", str(port), "1" if tiny else "0"]
    log = open(rec.path.parent / "serve-server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while not _get(base + "/health"):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see serve-server.log")
            time.sleep(0.5)
        rec.save(startup_s=time.perf_counter() - t0, port=port, site=site or None)
        levels = [1, 2] if tiny else [1, 16, 64]
        max_tokens = 8 if tiny else 128
        rows = []
        for c in levels:
            rows.append(_clients(base, c, requests=1 if tiny else 2, max_tokens=max_tokens))
            h = _get(base + "/health") or {}
            rows[-1]["max_rows_in_step"] = h.get("max_rows_in_step")
            rec.save(rows=rows)
        # the largest level again with sampling and every penalty on: what shaping each row costs a step
        rows.append(_clients(base, levels[-1], requests=1 if tiny else 2, max_tokens=max_tokens, extra=SAMPLED))
        rows[-1]["max_rows_in_step"] = (_get(base + "/health") or {}).get("max_rows_in_step")
        rec.save(rows=rows, status="done")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _get(url: str) -> dict[str, Any] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


# a sampled request with every shaping control on (each row then has its own LogitShaper on the device)
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1, "frequency_penalty": 0.5,
           "presence_penalty": 0.3}


def _stream_one(base: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, float]:
    import http.client
    import urllib.parse

    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, **(extra or {})})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        ev = json.loads(line[5:])
        if ev.get("choices") and ev["choices"][0].get("text") and first is None:
            first = time.perf_counter() - t0
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
    end = time.perf_counter() - t0
    conn.close()
    return {"ttft_s": first if first is not None else end, "latency_s": end, "tokens": tokens}


def _clients(base: str, c: int, requests: int, max_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request {i}: tell me about the number {i * 7 + 3} and what follows it." for i in range(c * requests)]
    t0 = time.perf_counter()

    def client(i: int) -> list[dict[str, float]]:
        return [_stream_one(base, prompts[i * requests + j], max_tokens, extra) for j in range(requests)]

    with ThreadPoolExecutor(c) as ex:
        res = [r for rs in ex.map(client, range(c)) for r in rs]
    wall = time.perf_counter() - t0
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    return {"clients": c, "requests": len(res), "sampling": "shaped" if extra else "greedy",
            "tokens_s": sum(r["tokens"] for r in res) / wall,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in res),
            "latency_p95_s": q([r["latency_s"] for r in res], 0.95), "wall_s": wall}


def serve_worker(port: int, tiny: bool) -> None:
    """The server process: a random model of the dense shape with the embedded tokenizer's vocabulary."""
    from dataclasses import replace

    from layerfold.evaluation.shapes import random_model
    from layerfold.serving.server import serve

    tok = _tokenizer(tiny)
    spec = replace(dense_spec(tiny), vocab_size=max(len(tok), dense_spec(tiny).vocab_size))
    dev = device(tiny)
    model = random_model(spec, dev, torch.float32 if tiny else torch.bfloat16)
    serve(model, tok, host="127.0.0.1", port=port, model_name="bench", log_level="warning",
          max_batch=4 if tiny else 64, max_len=256 if tiny else 512, max_queue=256)


def _tokenizer(tiny: bool):
    """The embedded model's tokenizer: from .gpu_assets/tokenizer (brought to a GPU machine), else the
    converted alias in the layerfold cache."""
    from layerfold.core.loading import load_tokenizer, resolve

    carried = ROOT / ".gpu_assets" / "tokenizer"
    return load_tokenizer(carried if carried.is_dir() else resolve("smollm2-135m", quiet=True))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "serve-worker":
    serve_worker(int(sys.argv[2]), sys.argv[3] == "1")


def part_calibration_big(rec: Recorder, tiny: bool) -> None:
    """Big calibrations on one GPU: the 7B shape with 64 x 2048 tokens (its window ring outgrows the device
    budget and goes to pinned host memory) and the 13B shape with 16 x 2048; wall, device peak, placement."""
    from layerfold.calibration.calibrate import calibrate
    from layerfold.evaluation.shapes import llama13b_spec

    dev = device(tiny)
    jobs = [("7B, 64 x 2048", dense_spec(tiny), (8, 64) if tiny else (64, 2048)),
            ("13B, 16 x 2048", tiny_dense() if tiny else llama13b_spec(), (4, 64) if tiny else (16, 2048))]
    rows = []
    for name, spec, (n, T) in jobs:
        model = host_model(spec, tiny)
        ids = torch.randint(3, spec.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        st = calibrate(model, ids, micro_batch=4 if not tiny else 2, device=dev)
        wall = time.perf_counter() - t
        rows.append({"job": name, "tokens": n * T, "wall_s": wall, "tokens_s": n * T / wall,
                     "device_peak_gb": st.meta.get("device_peak_bytes", 0) / 1e9, "buffers": st.meta.get("buffers"),
                     "buffer_gb": {k: v / 1e9 for k, v in (st.meta.get("buffer_bytes") or {}).items()}})
        rec.save(rows=rows)
        del model, st
        free()
    rec.save(status="done")
