"""`layerfold calibrate MODEL --data pydoc|FILE --samples N --seq-len T --out STATS [--plot]`.

Streams the calibration set through the model one layer at a time (layerfold.calibration.calibrate) and writes the
statistics (stats.safetensors + stats.json, and PNG figures with --plot) into STATS.

Under ``torchrun --nproc-per-node K -m layerfold calibrate ...`` every process takes every K-th sample,
the sums are all-reduced (gloo on CPU, NCCL with --device cuda: each process uses cuda:LOCAL_RANK),
and rank 0 writes the result.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

import torch

from layerfold.cli.util import add_common, count_arg, emit, torch_dtype
from layerfold.core.console import human_bytes, table
from layerfold.core.extras import require


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="stream calibration text through a model layer by layer; save statistics",
                       description="One streamed pass over the calibration set computes every statistic the "
                       "methods use: window cosines cos(h_i, h_i+k) (Block Influence), layer x layer CKA, "
                       "residual Grams (--grams, for SliceGPT) and channel magnitudes. Only one layer's weights "
                       "and one micro-batch are on the device at a time.")
    add_common(p)
    p.add_argument("--data", default="pydoc", help="'pydoc' (Python's documentation, built in) or a .txt/.jsonl file")
    p.add_argument("--samples", type=count_arg(1), default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=count_arg(2), default=256, help="tokens per sequence (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for the sequence offsets (default 0)")
    p.add_argument("--out", required=True, metavar="STATS", help="output directory for the statistics")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STATS directory")
    p.add_argument("--window", type=count_arg(0), default=8, help="largest k of cos(h_i, h_i+k) (default 8)")
    p.add_argument("--grams", action="store_true", help="also accumulate residual Grams X^T X (SliceGPT, d^2 each)")
    p.add_argument("--no-cka", action="store_true", help="skip the layer x layer CKA")
    p.add_argument("--no-channels", action="store_true", help="skip the FFN / attention channel magnitudes")
    p.add_argument("--cka-tokens", type=count_arg(4), default=128, help="tokens per CKA minibatch (one per sequence)")
    p.add_argument("--skip-positions", type=count_arg(0), default=1,
                   help="leave the first N positions of each sequence out of Grams and channel statistics "
                   "(massive activations at position 0; default 1)")
    p.add_argument("--skip-in", default="grams,channels",
                   help="statistics the position skip applies to, comma-separated from cos,cka,grams,channels "
                   "(default grams,channels: cosines and CKA use every token)")
    p.add_argument("--offload", choices=("host", "disk"), default="host",
                   help="where the hidden states of the set live between layers (default host memory)")
    p.add_argument("--offload-dir", default=None, help="directory for --offload disk files (default: temp dir)")
    p.add_argument("--micro-batch", type=count_arg(1), default=8, help="sequences per forward call (default 8)")
    p.add_argument("--plot", action="store_true", help="write cka.png, bi.png, cos_window.png into STATS")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _init_distributed(device: str) -> tuple[bool, int, str]:
    """(distributed?, rank, device) from torchrun's environment; NCCL on CUDA, gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, device
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return True, dist.get_rank(), device


def summarize(stats: Any, top: int = 5) -> dict[str, Any]:
    """Lowest-BI layers and the best LLM-Streamline windows (n = 4, 8 where the window allows)."""
    bi = stats.bi
    order = [i for i in bi.nan_to_num(float("inf")).argsort().tolist() if bi[i] == bi[i]][:top]
    windows = {}
    for n in (4, 8):
        if n <= stats.window:
            sc = stats.window_scores(n)
            j = int(sc.nan_to_num(-2.0).argmax())
            windows[n] = {"start": j, "layers": [j, j + n - 1], "cos": float(sc[j])}
    return {"lowest_bi": [{"layer": i, "bi": float(bi[i])} for i in order], "windows": windows,
            "bi": [float(x) for x in bi.tolist()]}


def run(args: argparse.Namespace) -> int:
    from layerfold.calibration.calibrate import calibrate, check_options
    from layerfold.core.checkpoint import check_finite
    from layerfold.core.loading import load_spec_state, load_tokenizer, resolve
    from layerfold.core.paths import check_output
    from layerfold.pipeline import calibration_set

    if args.plot:
        require("plot", "--plot")
    distributed, rank, device = _init_distributed(args.device)
    t0 = time.perf_counter()
    skip_in = [x for x in args.skip_in.split(",") if x]
    check_output(args.out, sources=[args.model], overwrite=args.overwrite)
    path = resolve(args.model, quiet=rank != 0)
    check_output(args.out, sources=[args.model, path], overwrite=args.overwrite)
    spec = load_spec_state(path, quiet=True)[0]
    check_options(spec.n_layers, args.window, args.cka_tokens, args.micro_batch, args.offload, args.skip_positions,
                  skip_in, args.offload_dir, seq_len=args.seq_len, context=spec.max_position)  # before any weight
    check_finite(load_spec_state(path, quiet=True)[1], str(args.model), allow=args.allow_nonfinite)
    tok = load_tokenizer(path)
    ids = calibration_set(tok, args.data, args.samples, args.seq_len, args.seed)
    data = {"data": str(args.data), "split": "calib", "seed": args.seed}
    stats = calibrate(path, ids, window=args.window, cka=not args.no_cka, cka_tokens=args.cka_tokens,
                      grams=args.grams, channels=not args.no_channels, micro_batch=args.micro_batch,
                      offload=args.offload, offload_dir=args.offload_dir, device=device,
                      dtype=torch_dtype(args.dtype), skip_positions=args.skip_positions,
                      skip_in=skip_in,
                      progress=not args.no_progress and not args.json, dist=distributed,
                      meta={"model": str(args.model), **data})
    if rank != 0:
        return 0
    stats.save(args.out, overwrite=args.overwrite)
    plots = []
    if args.plot:
        from layerfold.calibration.plots import plot_all

        plots = [str(p) for p in plot_all(stats, args.out, title=str(args.model))]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = summarize(stats)
    obj = {"out": str(args.out), "model": str(args.model), "samples": args.samples, "seq_len": args.seq_len,
           "tokens": stats.n_tokens, "time_s": round(time.perf_counter() - t0, 2),
           "calibrate_s": stats.meta["time_s"], "peak_rss_bytes": peak_rss,
           "device_peak_bytes": stats.meta.get("device_peak_bytes"), "plots": plots, **s}
    lines = [f"{args.model}: {stats.n_layers} layers, {args.samples} x {args.seq_len} = {stats.n_tokens} tokens "
             f"of {args.data}; calibration {stats.meta['time_s']:.1f} s (total {obj['time_s']:.1f} s), "
             f"peak RSS {human_bytes(peak_rss)}"
             + (f", device peak {human_bytes(obj['device_peak_bytes'])}" if obj["device_peak_bytes"] else ""),
             "", "lowest Block Influence (ShortGPT drops these first):",
             table([[r["layer"], r["bi"]] for r in s["lowest_bi"]], ["layer", "BI"])]
    if s["windows"]:
        lines += ["", "best LLM-Streamline windows (max cos(h_j, h_j+n)):",
                  table([[n, f"{w['layers'][0]}..{w['layers'][1]}", w["cos"]] for n, w in s["windows"].items()],
                        ["n", "layers", "cos"])]
    lines += ["", f"statistics -> {args.out}" + (f"; figures: {', '.join(os.path.basename(p) for p in plots)}"
                                                  if plots else "")]
    emit(args, obj, "\n".join(lines))
    return 0
