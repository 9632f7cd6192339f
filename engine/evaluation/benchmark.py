"""End-to-end decode speed of models on the lean runtime, against other engines, in one run.

For every (model, engine, batch size) the benchmark times a prefill of ``prompt_len`` random tokens
per sequence, the first token (TTFT), and ``new_tokens - 1`` greedy decode steps, and reports the
median and the range over ``repeats``. Engines (``ENGINES``):

- ``layerfold``: the runtime as users get it (GPU: the fused Triton step in CUDA graphs; CPU: the
  native step for small batches, the compiled torch step above);
- ``torch-eager``: the same runtime on plain torch ops (cuBLAS/oneDNN, SDPA), no graphs, no compile;
- ``torch-compile``: that torch step under ``torch.compile`` (its compile time reported apart);
- ``hf``: HF transformers' eager ``generate`` on the same weights.

The bound is bytes read per decode step (weights + the KV cache at the mean context) over a
bandwidth measured in the same run: the faster of a large GEMV (the operation decode is made of)
and a large max-reduction (a plain streaming read), on buffers far larger than the last-level cache.
The predicted speedup of a model over the first one is the ratio of their bytes per step.

On a CPU (a shared VM's bandwidth can drift within a minute; docs/PERFORMANCE.md) all units run
round-robin, interleaved, and the units a ratio compares run back to back; the bandwidth is probed
before every run. On a GPU the card is steady and memory is the limit: models and engines are built
and run one at a time, the bandwidth probed once per model, and each unit's untimed warm-up (graphs,
compiles, cuBLAS set-up) generates ``warmup_tokens`` only; its peak memory is the largest of all its runs.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from layerfold.core.devices import check_device, check_kv_fits
from layerfold.core.dtypes import check_dtype
from layerfold.core.model import Model
from layerfold.core.spec import ModelSpec
from layerfold.evaluation.bench_report import format_table, plot
from layerfold.evaluation.measure import Peak, hf_baseline, measure_bandwidth, run_hf, run_layerfold
from layerfold.evaluation.shapes import llama7b_spec, pruned_shapes, random_model
from layerfold.inference.runtime import GRAPH_BUCKETS, Runtime, decode_weight_bytes

__all__ = ["ENGINES", "bench_models", "format_table", "hf_baseline", "measure_bandwidth", "plot", "step_bytes"]

ENGINES = ("layerfold", "torch-eager", "torch-compile", "hf")
Builder = Callable[[], Model]


def step_bytes(spec: ModelSpec, dtype: torch.dtype, batch: int, context: float) -> float:
    """Bytes one decode step of ``batch`` rows reads: the weights once, and each row's KV cache at ``context``."""
    esize = torch.empty((), dtype=dtype).element_size()
    kv = batch * context * sum(2 * l.kv_dim for l in spec.layers if l.has_attn) * esize
    return decode_weight_bytes(spec, dtype) + kv


def _sources(models: Sequence[str | Path | Model], device: torch.device, dtype: torch.dtype | None,
             random_llama7b: bool, pruned: bool) -> list[tuple[str, Builder, ModelSpec, torch.dtype]]:
    """(label, builder, spec, dtype) of every model: each source is found and its spec read (no weight) here,
    before the first model is built, so that a missing second model does not cost the first one's load."""
    from layerfold.core.loading import load, load_spec_state

    out: list[tuple[str, Builder, ModelSpec, torch.dtype]] = []
    for i, src in enumerate(models):
        if isinstance(src, Model):
            name = str(getattr(src, "source", f"model{i}"))
            out.append((name, lambda src=src: src if dtype in (None, src.dtype) else copy.deepcopy(src).to(dtype),
                        src.spec, dtype or src.dtype))
        else:
            spec, state, _ = load_spec_state(src, quiet=True)
            stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
            out.append((str(src), lambda src=src: load(src, device=device, dtype=dtype, tokenizer=False,
                                                       quiet=True)[0], spec, dtype or stored))
    if random_llama7b or pruned:
        dense = llama7b_spec()
        dt = dtype or torch.bfloat16
        out.append(("random-llama7b", lambda: random_model(dense, device, dt), dense, dt))
        if pruned:
            for name, spec in pruned_shapes(dense).items():
                out.append((f"random-llama7b/{name}", lambda spec=spec: random_model(spec, device, dt), spec, dt))
    return out


def _check_args(models: Any, engines: Any, batch_sizes: Any, new_tokens: Any, prompt_len: Any, repeats: Any,
                static_batches: Any, warmup_tokens: Any = None) -> None:
    """``bench_models``' arguments checked before any model is read: TypeError / ValueError naming the argument."""
    from layerfold.core.args import whole

    if isinstance(models, (str, Path, Model)) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of models, not {type(models).__name__}. Fix: pass a list, e.g. "
                        "bench_models(['smollm2-135m']) or bench_models([model])")
    bad = [type(m).__name__ for m in models if not isinstance(m, (str, Path, Model))]
    if bad:
        raise TypeError(f"models holds a {bad[0]}. Fix: list sources (paths, aliases, Hub ids) or layerfold Models")
    if engines is not None and (isinstance(engines, str) or not isinstance(engines, Sequence)):
        raise TypeError(f"engines must be a list, not {type(engines).__name__}. Fix: e.g. engines=['layerfold', 'hf']")
    for name, sizes in (("batch_sizes", batch_sizes), ("static_batches", static_batches)):
        if isinstance(sizes, (str, int)) or not isinstance(sizes, Sequence):
            raise TypeError(f"{name} must be a list, not {type(sizes).__name__}. Fix: pass whole numbers, e.g. [1, 4]")
        for b in sizes:
            whole(f"{name} entry", b, 1)
    if not batch_sizes:
        raise ValueError("batch_sizes is empty. Fix: pass at least one batch size, e.g. [1]")
    whole("new_tokens", new_tokens, 2)  # a prefill token and at least one decode step
    whole("prompt_len", prompt_len, 1)
    whole("repeats", repeats, 1)
    if warmup_tokens is not None:
        whole("warmup_tokens", warmup_tokens, 2)
        if warmup_tokens > new_tokens:
            raise ValueError(f"warmup_tokens={warmup_tokens} exceeds new_tokens={new_tokens} (the cache is sized for "
                             "new_tokens). Fix: pass at most new_tokens, or None for min(new_tokens, 16)")


def _engine(name: str, m: Model, *, max_batch: int, max_len: int, compile: bool, native: bool | None,
            static_batches: Sequence[int], notes: list[str], label: str, kernels: str | None) -> tuple[Any, float]:
    """The engine object and its compile seconds (None if it cannot run this model: noted)."""
    if name == "hf":
        hf, why = hf_baseline(m)
        if hf is None:
            notes.append(f"{label}: {why}")
        return hf, 0.0
    if name == "layerfold":
        rt = Runtime(m, max_batch=max_batch, max_len=max_len, compile=compile, native=native, kernels=kernels,
                     static_batches=[b for b in static_batches if 2 <= b <= max_batch])
        if rt.native is not None:
            rows = "batch 1 decodes" if rt.native.max_rows == 1 else f"batches of 1-{rt.native.max_rows} decode"
            notes.append(f"{label}: {rows} on the native CPU step (layerfold.inference.native)")
        elif m.device.type == "cpu" and rt.native_why and rt.backend == "torch":
            notes.append(f"{label}: native CPU step off: {rt.native_why}")
        return rt, rt.compile_s
    rt = Runtime(m, max_batch=max_batch, max_len=max_len, kernels="torch", compile=name == "torch-compile",
                 cuda_graphs=False, native=False)
    return rt, rt.compile_s


def bench_models(models: Sequence[str | Path | Model], *, engines: Sequence[str] | None = None,
                 baseline: str | None = None, batch_sizes: Sequence[int] = (1,), new_tokens: int = 128,
                 prompt_len: int = 128, repeats: int = 3, dtype: torch.dtype | None = torch.bfloat16,
                 device: str | torch.device = "cpu", random_llama7b: bool = False, pruned_shapes: bool = False,
                 compile: bool | None = None, progress: bool = False, seed: int = 0,
                 static_batches: Sequence[int] = (), native: bool | None = None,
                 kernels: str | None = None, schedule: str | None = None,
                 warmup_tokens: int | None = None, on_built: Callable[[], None] | None = None) -> dict[str, Any]:
    """Benchmark ``models`` (sources or built Models; the random Llama-7B shapes with ``random_llama7b``,
    and their pruned shapes with ``pruned_shapes``) on ``engines`` (default: layerfold, plus HF with
    ``baseline="hf"``). Returns a dict with ``rows`` (one per model x engine x batch: prefill_tok_s,
    ttft_ms, decode_tok_s, their ranges, step_bytes, peak_mem_bytes, bound_tok_s, pct_of_bound,
    speedup and predicted_speedup vs the first model, vs_<engine> for the layerfold rows), ``bandwidth``,
    ``setup_s`` (load, build and compile seconds, apart from the timings) and ``notes``.
    compile: the layerfold engine compiles its torch step (None: on CPU, where it pays; on CUDA the
    step is a CUDA graph). static_batches / native / kernels: the layerfold engine's (see ``Runtime``).
    schedule: "interleaved" (default on CPU) or "sequential" (default on CUDA), see the module docstring.
    warmup_tokens: what the sequential schedule's warm-up run generates (None: min(new_tokens, 16)); the
    interleaved one warms up on all new_tokens. Layerfold rows get ``picks`` where the runtime reports them,
    and ``pick_ms``: what each candidate took when the picks were timed. on_built: called after each engine
    is built (compiled), before its first run (the GPU suite holds a compile there until other work ends)."""
    device = check_device(device)
    dtype = None if dtype is None else check_dtype(dtype)
    _check_args(models, engines, batch_sizes, new_tokens, prompt_len, repeats, static_batches, warmup_tokens)
    if baseline not in (None, "none", "hf"):
        raise ValueError(f"baseline={baseline!r} is unknown. Fix: use 'hf' or none")
    engines = list(engines or ["layerfold"]) + (["hf"] if baseline == "hf" and "hf" not in (engines or []) else [])
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"engines {bad} are unknown. Fix: choose from {', '.join(ENGINES)}")
    if (random_llama7b or pruned_shapes) and device.type != "cuda":
        raise ValueError("the random Llama-7B models need a GPU (14 GB of bf16 weights each). Fix: pass --device "
                         "cuda on a machine with one")
    if compile is None:
        compile = device.type == "cpu"
    if static_batches and not compile:
        raise ValueError("static batch graphs belong to the compiled runtime. Fix: drop --static-batches or "
                         "compile (--compile)")
    outside = [b for b in static_batches if not 2 <= b <= max(batch_sizes)]
    if outside:  # a graph no measured batch would use: refused rather than dropped without a word
        raise ValueError(f"--static-batches {outside}: a static graph serves batch sizes 2..{max(batch_sizes)} (the "
                         "largest of --batch-sizes). Fix: drop those sizes, or add them to --batch-sizes")
    sources = _sources(models, device, dtype, random_llama7b, pruned_shapes)
    if not sources:
        raise ValueError("nothing to benchmark. Fix: name at least one model (or --random-llama7b)")
    for label, _, spec, dt in sources:  # every model sized before the first is built (and compiled: minutes)
        _check_fits(label, spec, dt, max(batch_sizes), prompt_len + new_tokens, device)
    ctx = dict(batch_sizes=sorted(set(batch_sizes)), new_tokens=new_tokens, prompt_len=prompt_len,
               repeats=repeats, seed=seed, progress=progress, compile=compile, native=native,
               static_batches=static_batches, kernels=kernels, on_built=on_built,
               warmup_tokens=min(new_tokens, 16) if warmup_tokens is None else warmup_tokens)
    schedule = schedule or ("interleaved" if device.type == "cpu" else "sequential")
    if schedule not in ("interleaved", "sequential"):
        raise ValueError(f"schedule={schedule!r}. Fix: use 'interleaved' or 'sequential'")
    run = _run_interleaved if schedule == "interleaved" else _run_sequential
    units, bw_runs, setup, notes = run(sources, engines, device, **ctx)
    bw = {k: statistics.median(x[k] for x in bw_runs) for k in bw_runs[0]}
    rows = [_row(u, new_tokens, prompt_len, bw["bandwidth_gbs"]) for u in units if u["runs"]]
    _ratios(rows)
    try:
        load_avg = os.getloadavg()[0]
    except OSError:
        load_avg = float("nan")
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "dtype": str(units[0]["dtype"]).replace("torch.", "") if units else "-",
            "threads": torch.get_num_threads(), "compiled": compile, "load_avg_1min": load_avg, "engines": engines,
            "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats, "bandwidth": bw,
            "static_batches": sorted(set(static_batches)), "setup_s": setup, "notes": notes, "rows": rows}


def _unit(label: str, engine: str, b: int, obj: Any, prompts: list[list[int]], m: Model, setup_mem: int) -> dict:
    return {"model": label, "engine": engine, "batch": b, "obj": obj, "prompts": prompts[:b], "spec": m.spec,
            "params": m.num_params(), "dtype": m.dtype, "setup_mem": setup_mem, "runs": []}


def _check_fits(label: str, spec: ModelSpec, dtype: torch.dtype, bmax: int, max_len: int,
                device: torch.device) -> None:
    """A ValueError when prompt + new tokens pass the model's context, or the largest batch's KV cache its memory."""
    if max_len > spec.max_position:
        raise ValueError(f"{label}: prompt_len + new_tokens = {max_len} exceeds its {spec.max_position} positions. "
                         f"Fix: lower --prompt-len / --new-tokens to sum to at most {spec.max_position}")
    try:  # the largest batch's cache
        check_kv_fits(spec, bmax, max_len, dtype, device, "lower --batch-sizes (or --prompt-len / --new-tokens)")
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def _prompts(m: Model, bmax: int, prompt_len: int, max_len: int, label: str, gen: torch.Generator) -> list[list[int]]:
    _check_fits(label, m.spec, m.dtype, bmax, max_len, m.device)
    return torch.randint(3, m.spec.vocab_size, (bmax, prompt_len), generator=gen).tolist()


def _timed(u: dict[str, Any], new_tokens: int, device: torch.device) -> dict[str, float]:
    fn = run_layerfold if u["engine"] != "hf" else run_hf
    with Peak(device) as pk:
        res = fn(u["obj"], u["prompts"], new_tokens)
    res["peak"] = pk.peak
    return res


class _Setup:
    """What both schedules share: loading each model and building each engine, with their times and notes."""

    def __init__(self, device: torch.device, *, batch_sizes, new_tokens, prompt_len, seed, compile, native,
                 static_batches, kernels, **_: Any):
        self.device, self.notes, self.times = device, [], {}
        self.gen = torch.Generator().manual_seed(seed)
        self.bmax, self.max_len, self.prompt_len = max(batch_sizes), prompt_len + new_tokens, prompt_len
        self.opts = dict(compile=compile, native=native, static_batches=static_batches, kernels=kernels)

    def models(self, sources: list[tuple[str, Builder, ModelSpec, torch.dtype]]):
        """(label, model, prompts) for each source, built when the caller asks for it."""
        for label, build, *_ in sources:
            t = time.perf_counter()
            m = build()
            self.times[f"load {label}"] = time.perf_counter() - t
            yield label, m, _prompts(m, self.bmax, self.prompt_len, self.max_len, label, self.gen)
            del m  # the next model is built with this one released

    def engine(self, eng: str, m: Model, label: str) -> tuple[Any, int]:
        """(engine object or None, device/host memory it took)."""
        o = self.opts
        t = time.perf_counter()
        try:
            with Peak(self.device) as pk:
                obj, comp = _engine(eng, m, max_batch=self.bmax, max_len=self.max_len,
                                    compile=o["compile"] and eng == "layerfold", native=o["native"],
                                    static_batches=o["static_batches"], notes=self.notes, label=label,
                                    kernels=o["kernels"])
        except torch.OutOfMemoryError:
            self.notes.append(f"{label}: {eng} skipped: out of device memory")
            return None, 0
        self.times[f"{eng} {label}"] = time.perf_counter() - t
        if comp:
            self.times[f"compile {eng} {label}"] = comp
        return obj, pk.peak


def _run_interleaved(sources, engines, device, **ctx):
    """CPU: every unit built first, then rounds over all of them (see the module docstring)."""
    st = _Setup(device, **ctx)
    units: list[dict[str, Any]] = []
    for label, m, prompts in st.models(sources):
        for eng in engines:
            obj, mem = st.engine(eng, m, label)
            if obj is not None:
                units += [_unit(label, eng, b, obj, prompts, m, mem) for b in ctx["batch_sizes"]]
    if units and ctx["on_built"] is not None:
        ctx["on_built"]()
    bw_runs: list[dict[str, float]] = []
    total, done = ctx["repeats"] * len(units), 0
    order = sorted(units, key=lambda u: (u["batch"], u["engine"] != "layerfold"))  # stable: models keep their order
    for r in range(ctx["repeats"] + 1):  # round 0 warms every unit up (and measures its memory)
        for u in order:
            bw_now = None
            if r and u["engine"] == "layerfold":  # the bound's bandwidth, probed right before this run
                bw_runs.append(measure_bandwidth(device, u["dtype"], min_s=0.25))
                bw_now = bw_runs[-1]["bandwidth_gbs"]
            res = _timed(u, ctx["new_tokens"], device)
            if r == 0:
                u["peak"] = res["peak"] + u["setup_mem"]
                continue
            res["bandwidth_gbs"] = bw_now
            u["runs"].append(res)
            done += 1
            if ctx["progress"]:
                print(f"\r[bench] {done}/{total} {u['model']} {u['engine']} batch {u['batch']}", end="", flush=True)
    if ctx["progress"]:
        print("\r" + " " * 60 + "\r", end="", flush=True)
    if not bw_runs:
        bw_runs.append(measure_bandwidth(device, units[0]["dtype"] if units else torch.bfloat16, min_s=0.25))
    return units, bw_runs, st.times, st.notes


def _run_sequential(sources, engines, device, **ctx):
    """GPU: one model and one engine on the device at a time; each unit's repeats back to back."""
    st = _Setup(device, **ctx)
    done: list[dict[str, Any]] = []
    bw_runs: list[dict[str, float]] = []
    for label, m, prompts in st.models(sources):
        t = time.perf_counter()
        bw_runs.append(measure_bandwidth(device, m.dtype, min_s=0.25))
        st.times[f"probe {label}"] = time.perf_counter() - t
        for eng in engines:
            obj, mem = st.engine(eng, m, label)
            if obj is not None and ctx["on_built"] is not None:
                ctx["on_built"]()
            for b in ctx["batch_sizes"] if obj is not None else ():
                u = _unit(label, eng, b, obj, prompts, m, mem)
                t = time.perf_counter()
                try:
                    for r in range(ctx["repeats"] + 1):  # run 0: a short warm-up
                        res = _timed(u, ctx["new_tokens"] if r else ctx["warmup_tokens"], device)
                        u.setdefault("warmup_s", time.perf_counter() - t)
                        u["peak"] = max(u.get("peak", 0), res["peak"] + u["setup_mem"])  # caches grow with tokens
                        if r:
                            res["bandwidth_gbs"] = bw_runs[-1]["bandwidth_gbs"]
                            u["runs"].append(res)
                    picks = getattr(obj, "graph_picks", None) if eng == "layerfold" else None
                    if picks:  # the implementations the bucket this batch ran in got
                        bucket = next((x for x in GRAPH_BUCKETS if b <= x <= getattr(obj, "max_batch", b)), b)
                        if picks.get(bucket):
                            u["picks"] = dict(picks[bucket])
                            u["pick_ms"] = obj.graph_timings.get(bucket, {})
                except torch.OutOfMemoryError:
                    st.notes.append(f"{label}: {eng} batch {b} skipped: out of device memory")
                    u["runs"] = []
                u["obj"], u["wall_s"] = None, time.perf_counter() - t  # the unit's wall: warm-up, runs, between
                done.append(u)
                if ctx["progress"]:
                    print(f"[bench] {label} {eng} batch {b}: {len(u['runs'])} runs", flush=True)
            obj = None
            gc.collect()
            torch.cuda.empty_cache()
        m = None
        gc.collect()
        torch.cuda.empty_cache()
    return done, bw_runs, st.times, st.notes


def _paired(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, list[float]]:
    """Median and range over repeats of row's decode rate over ref's in the same round."""
    ratios = [a / b for a, b in zip(row["decode_runs"], ref["decode_runs"], strict=False)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def _ratios(rows: list[dict[str, Any]]) -> None:
    """speedup / predicted_speedup against the first model (same engine and batch), and each layerfold
    row against every other engine on the same model and batch (vs_<engine>)."""
    if not rows:
        return
    first = rows[0]["model"]
    find = lambda model, eng, b: next((x for x in rows if (x["model"], x["engine"], x["batch"]) == (model, eng, b)),
                                      None)
    for row in rows:
        ref = find(first, row["engine"], row["batch"])
        if ref is not None:
            row["speedup"], row["speedup_range"] = _paired(row, ref)
            row["predicted_speedup"] = ref["step_bytes"] / row["step_bytes"]
        if row["engine"] == "layerfold":
            for eng in ENGINES[1:]:
                other = find(row["model"], eng, row["batch"])
                if other is not None:
                    key = "vs_hf" if eng == "hf" else f"vs_{eng.replace('-', '_')}"
                    row[key], row[f"{key}_range"] = _paired(row, other)


def _row(u: dict[str, Any], new_tokens: int, prompt_len: int, bw_gbs: float) -> dict[str, Any]:
    b = u["batch"]
    prefill = [b * prompt_len / x["ttft_s"] for x in u["runs"]]
    decode = [b * (new_tokens - 1) / x["decode_s"] for x in u["runs"]]
    ttft = [1e3 * x["ttft_s"] for x in u["runs"]]
    spec: ModelSpec = u["spec"]
    nbytes = step_bytes(spec, u["dtype"], b, prompt_len + new_tokens / 2)  # the mean context of a decode step
    bound = b * bw_gbs * 1e9 / nbytes  # tokens/s if a step cost only its memory reads
    med = statistics.median(decode)
    # % of the bound run by run, each against the bandwidth probed for it (CPU: just before it)
    pct = [100.0 * rate * nbytes / (b * x["bandwidth_gbs"] * 1e9)
           for rate, x in zip(decode, u["runs"], strict=True) if x.get("bandwidth_gbs")]
    if not pct:
        pct = [100.0 * med / bound]
    return {"model": u["model"], "engine": u["engine"], "batch": b, "params": u["params"],
            "weight_bytes": decode_weight_bytes(spec, u["dtype"]), "step_bytes": nbytes,
            "prefill_tok_s": statistics.median(prefill), "prefill_range": [min(prefill), max(prefill)],
            "ttft_ms": statistics.median(ttft), "ttft_range": [min(ttft), max(ttft)],
            "decode_tok_s": med, "decode_range": [min(decode), max(decode)], "decode_runs": decode,
            "peak_mem_bytes": u.get("peak", 0), "bound_tok_s": bound, "pct_of_bound": statistics.median(pct),
            "pct_of_bound_range": [min(pct), max(pct)],
            **({"picks": u["picks"], "pick_ms": u.get("pick_ms", {})} if u.get("picks") else {}),
            **{k: u[k] for k in ("warmup_s", "wall_s") if k in u}}

