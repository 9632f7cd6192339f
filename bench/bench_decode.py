"""Where a decode step's time goes on this machine, in physical units.

    python bench/bench_decode.py [MODEL] [--dtype bf16] [--tokens 64] [--repeats 5] [--compile]
                                 [--batch N [--static]] [--json]
    python bench/bench_decode.py --compile --repeats 8 --tokens 127   # native vs compiled batch-1 step

Measures, interleaved over repeats (median and range):
  * read bandwidth: a GEMV over a 256 MiB matrix and a plain reduction (GB/s),
  * the model's layer matrices and head as a chain of GEMVs, plain F.linear vs oneDNN-packed (GB/s),
  * the Runtime's decode step at batch N (default 1): eager over plain weights, eager over packed
    weights (the CPU default) and, with --compile, torch.compile + freezing (compile time reported
    apart); with --static and N > 1 also the compiled step with a graph of its own for batch N
    (``Runtime(static_batches=(N,))``) next to the graph batches of 2 and more share; up to batch 4
    also the native CPU step (``layerfold.inference.native``) where it can run,
and prints each as tokens/s and as a percentage of the bandwidth bound (weight bytes / bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)
import torch
import torch.nn.functional as F

from layerfold.core.loading import load  # noqa: E402
from layerfold.evaluation.measure import measure_bandwidth  # noqa: E402
from layerfold.inference.decode_net import can_pack, pack, packed_linear  # noqa: E402
from layerfold.inference.native import NativeDecode  # noqa: E402
from layerfold.inference.runtime import Runtime  # noqa: E402


def matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name] + \
        [model.head_weight().detach()]


def gemv_chain(ws: list[torch.Tensor], packed: bool) -> float:
    """Seconds for one GEMV through every matrix (what a decode step reads)."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in ws}
    ps = [pack(w) for w in ws] if packed else ws
    t = time.perf_counter()
    for w, p in zip(ws, ps, strict=True):
        packed_linear(xs[w.shape[1]], p) if packed else F.linear(xs[w.shape[1]], p)
    return time.perf_counter() - t


def decode_rate(rt: Runtime, tokens: int, batch: int = 1) -> float:
    rt.reset()
    tok = rt.prefill([list(range(100 + b, 228 + b)) for b in range(batch)]).argmax(-1).tolist()
    t = time.perf_counter()
    for _ in range(tokens):
        tok = rt.decode(tok).argmax(-1).tolist()
    return batch * tokens / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tokens", type=int, default=64, help="decode steps a measurement (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compile'd step")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    ap.add_argument("--static", action="store_true",
                    help="with --compile and --batch > 1: also the compiled step with its own graph for that batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, _ = load(args.model, dtype=dtype, tokenizer=False, quiet=True)
    ws = matrices(model)
    wbytes = Runtime(model, max_len=8, native=False).weight_bytes()
    mbytes = sum(w.numel() * w.element_size() for w in ws)
    B = args.batch
    if B < 1 or (args.static and (B < 2 or not args.compile)):
        ap.error("--batch must be >= 1; --static needs --compile and --batch >= 2")
    engines: dict[str, Runtime] = {"eager, plain weights": Runtime(model, max_batch=B, max_len=256,
                                                                   pack_weights=False, native=False)}
    if can_pack(torch.device("cpu"), dtype):
        engines["eager, packed weights"] = Runtime(model, max_batch=B, max_len=256, pack_weights=True, native=False)
    if B <= NativeDecode.MAX_ROWS:
        rt = Runtime(model, max_batch=B, max_len=256)
        if rt.native is not None:
            engines["native CPU step"] = rt
    compile_s = None
    if args.compile:
        rt = Runtime(model, max_batch=B, max_len=256, compile=True, native=False)
        engines["torch.compile + freezing" + (", shared graph" if B > 1 else "")] = rt
        compile_s = rt.compile_s
    if args.static:
        rt = Runtime(model, max_batch=B, max_len=256, compile=True, static_batches=(B,), native=False)
        engines[f"torch.compile + freezing, own graph for {B}"] = rt
        compile_s = (compile_s or 0) + rt.compile_s
    res: dict[str, list[float]] = {"bandwidth GB/s": [], "GEMV chain plain GB/s": [], "GEMV chain packed GB/s": []}
    res.update({f"decode tok/s: {k}": [] for k in engines})
    for r in range(args.repeats + 1):
        bw = measure_bandwidth("cpu", dtype)["bandwidth_gbs"]
        plain = mbytes / gemv_chain(ws, False) / 1e9
        packed = mbytes / gemv_chain(ws, True) / 1e9 if can_pack(torch.device("cpu"), dtype) else float("nan")
        rates = {k: decode_rate(rt, args.tokens, B) for k, rt in engines.items()}
        if r == 0:
            continue  # warm-up round
        res["bandwidth GB/s"].append(bw)
        res["GEMV chain plain GB/s"].append(plain)
        res["GEMV chain packed GB/s"].append(packed)
        for k, v in rates.items():
            res[f"decode tok/s: {k}"].append(v)
    bw = statistics.median(res["bandwidth GB/s"])
    bound = B * bw * 1e9 / wbytes  # weights read once a step for all rows (the small KV reads aside)
    out = {"model": args.model, "dtype": args.dtype, "batch": B, "threads": torch.get_num_threads(),
           "weight_bytes": wbytes,
           "bound_tok_s": bound, "compile_s": compile_s,
           "results": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in res.items()}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model} {args.dtype}, batch {B}, {torch.get_num_threads()} threads: {wbytes / 1e6:.0f} MB of "
          f"weights a step, bound {bound:.1f} tok/s at {bw:.1f} GB/s"
          + (f"; compile {compile_s:.0f} s" if compile_s else ""))
    width = max(map(len, out["results"]))
    for k, v in out["results"].items():
        pct = f"  ({100 * v['median'] / bound:.0f}% of bound)" if k.startswith("decode") else ""
        print(f"  {k:{width}s} {v['median']:8.1f}  [{v['min']:.1f}-{v['max']:.1f}]{pct}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
