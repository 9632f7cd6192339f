"""The benchmark's results as a text table and a bar chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot"]


def format_table(res: dict[str, Any]) -> str:
    from layerfold.core.console import human_bytes, table

    rows = []
    for r in res["rows"]:
        lo, hi = r["decode_range"]
        rows.append([r["model"], r["engine"], r["batch"], f"{r['params'] / 1e6:.1f}", f"{r['prefill_tok_s']:.0f}",
                     f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f} [{lo:.1f}-{hi:.1f}]",
                     _with_range(r, "pct_of_bound", "{:.0f}", "%"), human_bytes(r["peak_mem_bytes"]),
                     _with_range(r, "vs_hf", "{:.2f}", "x"),
                     _with_range(r, "vs_torch_eager", "{:.2f}", "x"), _with_range(r, "vs_torch_compile", "{:.2f}", "x"),
                     _with_range(r, "speedup", "{:.2f}", "x") + f" (pred {r['predicted_speedup']:.2f}x)"
                     if "speedup" in r else "-"])
    bw = res["bandwidth"]
    static = res.get("static_batches")
    dev = res.get("device_name", res["device"])
    head = (f"{dev} {res['dtype']}, {res['threads']} threads, load {res['load_avg_1min']:.1f}, runtime "
            f"{'compiled' if res.get('compiled') else 'eager'}"
            f"{' (own graphs at batch ' + ','.join(map(str, static)) + ')' if static else ''}; prompt "
            f"{res['prompt_len']} + {res['new_tokens']} new tokens, median [range] of {res['repeats']} interleaved "
            f"repeats; bandwidth {bw['bandwidth_gbs']:.1f} GB/s (median of probes before each run; GEMV "
            f"{bw['gemv_gbs']:.1f}, read {bw['read_gbs']:.1f})")
    lines = [head, table(rows, ["model", "engine", "batch", "params M", "prefill tok/s", "TTFT ms",
                                "decode tok/s", "% bound", "peak mem", "vs HF", "vs eager", "vs compile",
                                "speedup"])]
    lines += [f"note: {n}" for n in res["notes"]]
    lines.append("% bound: each run's decode rate over weight + KV bytes per step at the bandwidth probed just before "
                 "it; vs <engine> and speedup: ratios of runs in the same round (median [range] over rounds); pred: "
                 "the ratio of bytes read per decode step (weights + KV cache at the mean context)")
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
