"""`layerfold bench MODEL [MODEL ...]`: prefill, TTFT, decode speed and memory, vs HF and vs each other."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from layerfold.cli.util import add_dtype, count_arg, device_arg, emit, parse_sizes, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark models on the lean runtime (and HF transformers)",
                       description="Time prefill (tokens/s), time to first token, decode (tokens/s) and peak "
                       "memory of each MODEL on the lean runtime, with all models and engines in one run and "
                       "their repeats interleaved; report median and range, and decode speed as a percentage of "
                       "the memory-bandwidth bound (weight + KV bytes per step over a bandwidth measured in the "
                       "same run). The first MODEL is the reference for the speedup column.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="layerfold checkpoint dirs, HF model dirs, .gguf files, or aliases (smollm2-135m)")
    p.add_argument("--baseline", choices=["hf", "none"], default="none",
                   help="also run HF transformers generate() on the same weights (uniform models only)")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    p.add_argument("--new-tokens", type=count_arg(2), default=128,
                   help="tokens generated per sequence, 2 or more (default 128)")
    p.add_argument("--prompt-len", type=count_arg(1), default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--repeats", type=count_arg(1), default=3,
                   help="timed repeats of every unit, interleaved (default 3)")
    add_dtype(p, default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's default, one per core)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the runtime's decode step (default: on for CPU, where it pays; the compile "
                   "time, about a minute or two per model, is reported apart). --no-compile measures eager")
    p.add_argument("--static-batches", default="", metavar="N,N",
                   help="compiled runtime: batch sizes that get their own autotuned graph, e.g. 4,16 (about a "
                   "minute more of compiling each per model; default none: batch 1 has its own, the others "
                   "share one)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps of up to 4 rows on the native CPU step (default: where it can "
                   "run, bf16 on x86 CPUs with AVX-512 BF16). --no-native measures the torch step at every batch")
    p.add_argument("--random-llama7b", action="store_true",
                   help="also bench a random-weight model with Llama-2-7B's shapes (GPU only)")
    p.add_argument("--pruned-shapes", action="store_true",
                   help="with the random Llama-7B: also the shapes ShortGPT, Streamline, dynamic slicing and CoMe "
                   "make of it (8 of 32 layers; 25%% mean width), each against the dense one (GPU only)")
    p.add_argument("--engines", default="layerfold", metavar="E,E",
                   help="engines to compare: layerfold, torch-eager, torch-compile, hf (default layerfold; "
                   "--baseline hf adds hf)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a bar chart of the results to this PNG file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfold.core.extras import require
    from layerfold.evaluation.benchmark import bench_models, format_table, plot

    if args.plot:
        require("plot", "--plot")
        check_plot_path(args.plot, sources=args.models)

    if args.threads is not None:
        cpus = os.cpu_count() or 1
        if not 1 <= args.threads <= cpus:  # more threads than CPUs only slows torch; 10**5 crashes it
            raise ValueError(f"--threads {args.threads}: this machine has {cpus} CPUs. Fix: pass a thread count "
                             f"from 1 to {cpus}")
        import torch

        torch.set_num_threads(args.threads)
    if not args.models and not (args.random_llama7b or args.pruned_shapes):
        raise ValueError("no model to benchmark. Fix: name one or more models (e.g. smollm2-135m)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    res = bench_models(args.models, engines=engines, baseline=None if args.baseline == "none" else args.baseline,
                       batch_sizes=parse_sizes(args.batch_sizes), new_tokens=args.new_tokens,
                       prompt_len=args.prompt_len, repeats=args.repeats, dtype=torch_dtype(args.dtype),
                       device=args.device, random_llama7b=args.random_llama7b, pruned_shapes=args.pruned_shapes,
                       compile=args.compile,
                       static_batches=parse_sizes(args.static_batches, "--static-batches", empty=True, example="4,16"),
                       native=args.native, progress=not args.json)
    if args.plot:
        plot(res, args.plot)
        res["plot"] = args.plot
    emit(args, res, format_table(res) + (f"\nchart: {args.plot}" if args.plot else ""))
    return 0


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def check_plot_path(path: str, sources: Sequence[str] = ()) -> None:
    """--plot checked before the benchmark runs (minutes), not when the chart is written after it: an image file
    name in a folder that exists and may be written, outside the models, and replacing only an earlier chart."""
    from layerfold.core.paths import check_output_file

    p = Path(path)
    if p.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {path}: not an image file name. Fix: end it in one of {', '.join(PLOT_SUFFIXES)}")
    if p.is_dir() or not p.parent.is_dir():
        what = "is a directory" if p.is_dir() else f"its folder {p.parent} does not exist"
        raise ValueError(f"--plot {path}: {what}. Fix: name an image file in an existing folder")
    check_output_file(p, sources=sources, what="--plot", replace=_earlier_chart)


def _earlier_chart(path: Path) -> bool:
    """Whether ``path`` is a chart matplotlib wrote (its PNG/SVG/PDF names it), which a new run may replace."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read()
    except OSError:
        return False
    return b"matplotlib" in (head + tail).lower()
