"""End-to-end speed of models on the lean runtime (and on HF transformers as the baseline), in one run.

For every (model, engine, batch size) the benchmark times a prefill of ``prompt_len`` random tokens
per sequence, the first token (TTFT), and ``new_tokens - 1`` greedy decode steps, repeating all units
round-robin (interleaved, so drifting machine load hits every unit alike; the units a ratio compares
run back to back) and reporting the median and the range. The memory-bandwidth bound is weight (+ KV)
bytes read per decode step over a bandwidth measured in the same run: the faster of a large GEMV
(the operation decode is made of) and a large max-reduction (a plain streaming read), each on a
buffer far larger than the last-level cache.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.core.spec import ModelSpec
from layerfold.evaluation.bench_report import format_table, plot
from layerfold.evaluation.measure import Peak, hf_baseline, measure_bandwidth, run_hf, run_layerfold
from layerfold.evaluation.shapes import llama7b_spec, random_model
from layerfold.inference.native import NativeDecode
from layerfold.inference.runtime import Runtime, decode_weight_bytes

__all__ = ["bench_models", "format_table", "hf_baseline", "llama7b_spec", "measure_bandwidth", "plot"]


# ---- the benchmark --------------------------------------------------------------------------------
def bench_models(models: Sequence[str | Path | Model], *, baseline: str | None = None,
                 batch_sizes: Sequence[int] = (1,), new_tokens: int = 128, prompt_len: int = 128,
                 repeats: int = 3, dtype: torch.dtype | None = torch.bfloat16, device: str | torch.device = "cpu",
                 random_llama7b: bool = False, compile: bool | None = None, progress: bool = False,
                 seed: int = 0, static_batches: Sequence[int] = (), native: bool | None = None) -> dict[str, Any]:
    """Benchmark ``models`` (sources or built Models) and optionally the HF baseline; returns a dict
    with ``rows`` (one per model x engine x batch: prefill_tok_s, ttft_ms, decode_tok_s, their ranges,
    peak_mem_bytes, bound_tok_s, pct_of_bound, speedup vs the first model, vs_hf), ``bandwidth``,
    ``setup_s`` (load, runtime build and compile seconds, apart from the timings) and ``notes``. The
    first model is the reference for ``speedup``. compile: torch.compile the runtime's decode step
    (None: on CPU, where it pays, off on CUDA, where the decode step is a CUDA graph). static_batches: batch
    sizes that get their own autotuned graph in the compiled runtime (see ``Runtime``). native: the
    runtime's native CPU step for batches of up to 4 (None: where it can run; see ``Runtime``)."""
    from layerfold.core.loading import load

    device = torch.device(device)
    if new_tokens < 2 or prompt_len < 1 or repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need new_tokens >= 2, prompt_len >= 1, repeats >= 1 and batch sizes >= 1. Fix: check "
                         "the benchmark arguments")
    if baseline not in (None, "none", "hf"):
        raise ValueError(f"baseline={baseline!r} is unknown. Fix: use 'hf' or none")
    if random_llama7b and device.type != "cuda":
        raise ValueError("the random Llama-7B model needs a GPU (14 GB of bf16 weights). Fix: pass --device cuda "
                         "on a machine with one")
    if compile is None:
        compile = device.type == "cpu"
    if static_batches and not compile:
        raise ValueError("static batch graphs belong to the compiled runtime. Fix: drop --static-batches or "
                         "compile (--compile)")
    notes: list[str] = []
    setup: dict[str, float] = {}
    built: list[tuple[str, Model]] = []
    for src in models:
        t = time.perf_counter()
        if isinstance(src, Model):
            m = src if dtype in (None, src.dtype) else copy.deepcopy(src).to(dtype)  # never the caller's
            name = str(getattr(src, "source", f"model{len(built)}"))
        else:
            m, name = load(src, device=device, dtype=dtype, tokenizer=False, quiet=True)[0], str(src)
        setup[f"load {name}"] = time.perf_counter() - t
        built.append((name, m))
    if random_llama7b:
        built.append(("random-llama7b", random_model(llama7b_spec(), device, dtype or torch.bfloat16)))
    if not built:
        raise ValueError("nothing to benchmark. Fix: name at least one model (or --random-llama7b)")
    gen = torch.Generator().manual_seed(seed)
    bmax, max_len = max(batch_sizes), prompt_len + new_tokens
    units: list[dict[str, Any]] = []
    for name, m in built:
        if max_len > m.spec.max_position:
            raise ValueError(f"{name}: prompt_len + new_tokens = {max_len} exceeds its {m.spec.max_position} "
                             "positions. Fix: shorten them")
        prompts = torch.randint(3, m.spec.vocab_size, (bmax, prompt_len), generator=gen).tolist()
        t = time.perf_counter()
        with Peak(device) as pk:
            rt = Runtime(m, max_batch=bmax, max_len=max_len, compile=compile, native=native,
                         static_batches=[b for b in static_batches if 2 <= b <= bmax])
        setup[f"runtime {name}"] = time.perf_counter() - t
        if rt.native is not None:
            rows = "batch 1 decodes" if rt.native.max_rows == 1 else f"batches of 1-{rt.native.max_rows} decode"
            notes.append(f"{name}: {rows} on the native CPU step (layerfold.inference.native)")
        elif min(batch_sizes) <= NativeDecode.MAX_ROWS:
            notes.append(f"{name}: every batch decodes on the torch step (native CPU step off: {rt.native_why})")
        if compile:
            setup[f"compile {name}"] = rt.compile_s
        engines: list[tuple[str, Any, int]] = [("layerfold", rt, pk.peak)]
        if baseline == "hf":
            t = time.perf_counter()
            with Peak(device) as pk_hf:
                hf, why = hf_baseline(m)
            setup[f"hf {name}"] = time.perf_counter() - t
            if hf is None:
                notes.append(f"{name}: {why}")
            else:
                engines.append(("hf", hf, pk_hf.peak))
        for eng, obj, setup_mem in engines:
            for b in batch_sizes:
                units.append({"model": name, "engine": eng, "batch": b, "obj": obj, "prompts": prompts[:b],
                              "spec": m.spec, "params": m.num_params(), "dtype": m.dtype,
                              "setup_mem": setup_mem, "runs": []})
    bw_runs: list[dict[str, float]] = []
    total = repeats * len(units)
    done = 0
    # within a round, the units a ratio compares run back to back: every model's layerfold run at one batch
    # size, then HF's, then the next size (the pruned-vs-dense pair of a round a second apart, not half a
    # minute: this VM's bandwidth moves by 1.5x within a minute)
    order = sorted(units, key=lambda u: (u["batch"], u["engine"] != "layerfold"))  # stable: models keep their order
    for r in range(repeats + 1):  # round 0 warms every unit up (and measures its memory)
        for u in order:
            run = run_layerfold if u["engine"] == "layerfold" else run_hf
            bw_now = None
            if r and u["engine"] == "layerfold":  # the bound's bandwidth, probed right before this run
                bw_runs.append(measure_bandwidth(device, u["dtype"], min_s=0.25))
                bw_now = bw_runs[-1]["bandwidth_gbs"]
            with Peak(device) as pk:
                res = run(u["obj"], u["prompts"], new_tokens)
            if r == 0:
                u["peak"] = pk.peak + u["setup_mem"]
                continue
            res["bandwidth_gbs"] = bw_now
            u["runs"].append(res)
            done += 1
            if progress:
                print(f"\r[bench] {done}/{total} {u['model']} {u['engine']} batch {u['batch']}", end="", flush=True)
    if progress:
        print("\r" + " " * 60 + "\r", end="", flush=True)
    bw = {k: statistics.median(x[k] for x in bw_runs) for k in bw_runs[0]}
    rows = [_row(u, new_tokens, prompt_len, bw["bandwidth_gbs"]) for u in units]
    first = rows[0]["model"]
    for row in rows:
        ref = next((x for x in rows if x["model"] == first and x["engine"] == row["engine"]
                    and x["batch"] == row["batch"]), None)
        hf = next((x for x in rows if x["model"] == row["model"] and x["engine"] == "hf"
                   and x["batch"] == row["batch"]), None)
        if ref is not None:  # ratios of runs from the same round (the same machine state), then their median
            row["speedup"], row["speedup_range"] = _paired(row, ref)
            row["predicted_speedup"] = ref["params"] / row["params"]
        if hf is not None and row["engine"] == "layerfold":
            row["vs_hf"], row["vs_hf_range"] = _paired(row, hf)
    try:
        load_avg = os.getloadavg()[0]
    except OSError:
        load_avg = float("nan")
    return {"device": str(device), "dtype": str(built[0][1].dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "compiled": compile, "load_avg_1min": load_avg,
            "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats, "bandwidth": bw,
            "static_batches": sorted(set(static_batches)),
            "setup_s": setup, "notes": notes, "rows": rows}


def _paired(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, list[float]]:
    """Median and range over repeats of row's decode rate over ref's in the same round."""
    ratios = [a / b for a, b in zip(row["decode_runs"], ref["decode_runs"], strict=True)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def _row(u: dict[str, Any], new_tokens: int, prompt_len: int, bw_gbs: float) -> dict[str, Any]:
    b = u["batch"]
    prefill = [b * prompt_len / x["ttft_s"] for x in u["runs"]]
    decode = [b * (new_tokens - 1) / x["decode_s"] for x in u["runs"]]
    ttft = [1e3 * x["ttft_s"] for x in u["runs"]]
    spec: ModelSpec = u["spec"]
    wbytes = decode_weight_bytes(spec, u["dtype"])
    ctx = prompt_len + new_tokens / 2  # the mean context a decode step reads from the KV cache
    esize = torch.empty((), dtype=u["dtype"]).element_size()
    kv = b * ctx * sum(2 * l.kv_dim for l in spec.layers if l.has_attn) * esize
    step_bytes = wbytes + kv
    bound = b * bw_gbs * 1e9 / step_bytes  # tokens/s if a step cost only its memory reads
    med = statistics.median(decode)
    # % of the bound run by run, each against the bandwidth probed just before it: the machine's
    # bandwidth drifts (28-53 GB/s between runs on this project's VM), a run and its probe share a state
    pct = [100.0 * rate * step_bytes / (b * x["bandwidth_gbs"] * 1e9)
           for rate, x in zip(decode, u["runs"], strict=True) if x.get("bandwidth_gbs")]
    if not pct:
        pct = [100.0 * med / bound]
    return {"model": u["model"], "engine": u["engine"], "batch": b, "params": u["params"], "weight_bytes": wbytes,
            "prefill_tok_s": statistics.median(prefill), "prefill_range": [min(prefill), max(prefill)],
            "ttft_ms": statistics.median(ttft), "ttft_range": [min(ttft), max(ttft)],
            "decode_tok_s": med, "decode_range": [min(decode), max(decode)], "decode_runs": decode,
            "peak_mem_bytes": u.get("peak", 0), "bound_tok_s": bound, "pct_of_bound": statistics.median(pct),
            "pct_of_bound_range": [min(pct), max(pct)]}


