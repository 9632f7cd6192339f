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
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerfold.core.memstat import proc_status_bytes, reset_rss_peak
from layerfold.core.model import Model
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.inference.native import NativeDecode
from layerfold.inference.runtime import Runtime, decode_weight_bytes

__all__ = ["bench_models", "format_table", "hf_baseline", "llama7b_spec", "measure_bandwidth", "plot"]


# ---- measurements -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_time(fn: Callable[[], Any], device: torch.device, min_s: float = 0.5) -> float:
    """Mean seconds per call over at least ``min_s`` of back-to-back calls. A mean over a stretch of
    time (not the best short burst) meets the same preemption and memory traffic from other
    processes as the decode runs it is compared with, so a shared machine does not inflate the bound."""
    fn()
    _sync(device)
    n, t = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        el = time.perf_counter() - t
        if el >= min_s and n >= 3:
            return el / n


def measure_bandwidth(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      min_s: float = 0.5) -> dict[str, float]:
    """Achievable read bandwidth in GB/s: a GEMV over a 256 MiB (CPU) / 2 GiB (GPU) matrix of
    ``dtype`` and a max-reduction over the same bytes (both far beyond any cache), each timed over at
    least ``min_s`` seconds; the bound uses the faster of the two."""
    device = torch.device(device)
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    cols = 8192
    rows = nbytes // (cols * torch.empty((), dtype=dtype).element_size())
    w = torch.full((rows, cols), 0.01, device=device, dtype=dtype)  # written, so every page is real memory
    x = torch.randn(1, cols, device=device, dtype=dtype)
    size = w.numel() * w.element_size()
    gemv = size / _mean_time(lambda: F.linear(x, w), device, min_s) / 1e9
    flat = w.view(-1).view(torch.float32)  # a max over 4-byte words: the cheapest compute per byte read
    read = size / _mean_time(lambda: flat.amax(), device, min_s) / 1e9
    return {"gemv_gbs": gemv, "read_gbs": read, "bandwidth_gbs": max(gemv, read)}


class _Peak:
    """Peak memory growth over a block: RSS high-water mark on CPU (reset through
    /proc/self/clear_refs), the caching allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_rss_peak()
            self.base = proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, proc_status_bytes("VmHWM") - self.base)


# ---- engines --------------------------------------------------------------------------------------
def hf_baseline(model: Model) -> tuple[Any | None, str]:
    """The same weights in an HF transformers model (default attention, no compile), or None and why.

    Only a uniform spec maps onto an HF config; the logits are checked against ``model`` first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerfold.core.arch import hf_config_from_spec, state_to_hf

    try:
        cfg = hf_config_from_spec(model.spec)
    except ValueError as e:
        return None, f"HF baseline skipped: {str(e).split('. Fix')[0]}"
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    res = hf.load_state_dict(state_to_hf(model.state_dict(), model.spec), strict=False)
    if res.unexpected_keys or set(res.missing_keys) - ({"lm_head.weight"} if model.spec.tie_embeddings else set()):
        return None, f"HF baseline skipped: weight names do not map ({res})"
    if model.spec.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    # Ordinary (not special) tokens; half-precision forwards of two implementations round differently,
    # so there the check only catches gross mapping errors (a wrong rope or norm setting, a lost head).
    v = model.spec.vocab_size
    ids = torch.randint(v // 10, max(v // 2, v // 10 + 1), (2, 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with torch.inference_mode():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    err = (ours - theirs).abs().max().item() / max(ours.abs().max().item(), 1e-6)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    half = model.dtype in (torch.float16, torch.bfloat16)
    if err > (0.2 if half else 1e-3) or agree < (0.7 if half else 0.99):
        return None, (f"HF baseline skipped: its logits differ from layerfold's (relative {err:.2g}, argmax "
                      f"agreement {agree:.0%})")
    return hf, ""


def _run_layerfold(rt: Runtime, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    rt.reset()
    _sync(rt.device)
    t0 = time.perf_counter()
    tok = rt.prefill(prompts).argmax(-1).tolist()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = rt.decode(tok).argmax(-1).tolist()
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1}


def _run_hf(hf: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # put() sees the prompt, then every new token: stamp the first one
        def __init__(self) -> None:
            self.calls, self.first = 0, 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor(prompts, device=hf.device)
    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                          pad_token_id=0)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return {"ttft_s": clock.first - t0, "decode_s": t2 - clock.first}


def llama7b_spec() -> ModelSpec:
    """Llama-2-7B's shapes (32 layers, d 4096, 32 heads of 128, FFN 11008, vocab 32000)."""
    layer = LayerSpec(4096, 4096, 4096, n_heads=32, n_kv_heads=32, head_dim=128, d_ffn=11008)
    return ModelSpec(vocab_size=32000, d_model=4096, layers=(layer,) * 32, norm_eps=1e-5, max_position=4096,
                     bos_token_id=1, eos_token_ids=(2,))


def _random_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Model:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            m = Model(spec)
            for name, p in m.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    finally:
        torch.set_default_dtype(old)
    return m.eval()


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
        built.append(("random-llama7b", _random_model(llama7b_spec(), device, dtype or torch.bfloat16)))
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
        with _Peak(device) as pk:
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
            with _Peak(device) as pk_hf:
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
            run = _run_layerfold if u["engine"] == "layerfold" else _run_hf
            bw_now = None
            if r and u["engine"] == "layerfold":  # the bound's bandwidth, probed right before this run
                bw_runs.append(measure_bandwidth(device, u["dtype"], min_s=0.25))
                bw_now = bw_runs[-1]["bandwidth_gbs"]
            with _Peak(device) as pk:
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


def format_table(res: dict[str, Any]) -> str:
    from layerfold.core.console import human_bytes, table

    rows = []
    for r in res["rows"]:
        lo, hi = r["decode_range"]
        rows.append([r["model"], r["engine"], r["batch"], f"{r['params'] / 1e6:.1f}", f"{r['prefill_tok_s']:.0f}",
                     f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f} [{lo:.1f}-{hi:.1f}]",
                     _with_range(r, "pct_of_bound", "{:.0f}", "%"), human_bytes(r["peak_mem_bytes"]),
                     _with_range(r, "vs_hf", "{:.2f}", "x"),
                     _with_range(r, "speedup", "{:.2f}", "x") + f" (pred {r['predicted_speedup']:.2f}x)"
                     if "speedup" in r else "-"])
    bw = res["bandwidth"]
    static = res.get("static_batches")
    head = (f"{res['device']} {res['dtype']}, {res['threads']} threads, load {res['load_avg_1min']:.1f}, runtime "
            f"{'compiled' if res.get('compiled') else 'eager'}"
            f"{' (own graphs at batch ' + ','.join(map(str, static)) + ')' if static else ''}; prompt "
            f"{res['prompt_len']} + {res['new_tokens']} new tokens, median [range] of {res['repeats']} interleaved "
            f"repeats; bandwidth {bw['bandwidth_gbs']:.1f} GB/s (median of probes before each run; GEMV "
            f"{bw['gemv_gbs']:.1f}, read {bw['read_gbs']:.1f})")
    lines = [head, table(rows, ["model", "engine", "batch", "params M", "prefill tok/s", "TTFT ms",
                                "decode tok/s", "% bound", "peak mem", "vs HF", "speedup"])]
    lines += [f"note: {n}" for n in res["notes"]]
    lines.append("% bound: each run's decode rate over weight + KV bytes per step at the bandwidth probed just before "
                 "it; vs HF and speedup: ratios of runs in the same round (median [range] over rounds)")
    lines.append("peak mem: memory growth for building the engine (its own weight copies and KV cache) plus one "
                 "generation (RSS on CPU, allocator peak on CUDA)")
    lines.append("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["setup_s"].items()))
    return "\n".join(lines)


def _with_range(r: dict[str, Any], key: str, fmt: str, unit: str) -> str:
    if key not in r:
        return "-"
    lo, hi = r.get(f"{key}_range", (r[key], r[key]))
    text = fmt.format(r[key]) + unit
    return text if fmt.format(lo) == fmt.format(hi) else f"{text} [{fmt.format(lo)}-{fmt.format(hi)}]"


def plot(res: dict[str, Any], path: str | Path) -> None:
    """Bar charts of decode and prefill tokens/s per model, engine and batch size (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = sorted({(r["model"], r["engine"]) for r in rows}, key=lambda k: [(x["model"], x["engine"])
                                                                                for x in rows].index(k))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(labels))
    panels = ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s", "prefill tokens/s"))
    for ax, key, title in panels:
        for i, (model, eng) in enumerate(labels):
            ys = [next((r[key] for r in rows if (r["model"], r["engine"], r["batch"]) == (model, eng, b)), math.nan)
                  for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ys, width, label=f"{Path(model).name} ({eng})")
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"layerfold bench: {res['device']} {res['dtype']}, {res['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
