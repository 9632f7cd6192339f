"""Constant (SliceGPT) vs dynamic slicing on one model: quality, parameters and decode latency in one run.

    python tools/compare_slicing.py                       # the docs/RESULTS.md width table (SmolLM2-135M)
    python tools/compare_slicing.py --targets 0.25 --bases 0.1 --dtypes fp32 --mc-items 100   # quicker
    python tools/compare_slicing.py --bench-widths        # which rounding multiple is fastest here

Per target: one constant-slicing model and one dynamic-slicing model per slicing base SB. Each is
evaluated on the ``val`` split (layerfold.evaluation.evaluate: perplexity and multiple-choice accuracy) and timed
against the dense model in the same run: greedy decode of ``--new-tokens`` tokens at batch 1 through
layerfold.inference.runtime.Runtime (static KV cache), dense and sliced interleaved repeat by repeat so that load on
a shared machine hits both alike; the median ms/token is reported. Results are appended to ``--json``
as they come (a long run can be read while it goes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)

from layerfold import load  # noqa: E402
from layerfold.core.console import table  # noqa: E402
from layerfold.core.dtypes import DTYPES  # noqa: E402
from layerfold.core.model import Model  # noqa: E402
from layerfold.methods.slicing import make_plan  # noqa: E402
from layerfold.surgery.slicing import SlicePlan, count_params, slice_model  # noqa: E402


def decoder(model: Model, dtype: torch.dtype, max_len: int) -> Any:
    """A callable greedy(prompt, n) -> seconds per new token (decode steps only, prefill excluded)."""
    from layerfold.inference.runtime import Runtime

    rt = Runtime(model, max_batch=1, max_len=max_len, dtype=dtype)

    def greedy(prompt: list[int], n: int) -> float:
        rt.reset()
        tok = int(rt.prefill([prompt])[0].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(rt.decode([tok])[0].argmax())
        return (time.perf_counter() - t0) / n

    return greedy


def time_pair(dense: Any, sliced: Any, prompt: list[int], n: int, repeats: int) -> tuple[float, float]:
    """Median ms/token of dense and sliced, measured alternately (one warm-up each)."""
    dense(prompt, 4)
    sliced(prompt, 4)
    td, ts = [], []
    for _ in range(repeats):
        td.append(dense(prompt, n))
        ts.append(sliced(prompt, n))
    return 1e3 * statistics.median(td), 1e3 * statistics.median(ts)


def evaluate_model(model: Model, tok: Any, args: argparse.Namespace) -> dict[str, float]:
    from layerfold.evaluation.evaluate import evaluate

    r = evaluate(model, tok, data=args.data, tasks=("ppl", "mc"), seq_len=args.eval_seq_len,
                 mc_items=args.mc_items, batch_size=4)
    return {"ppl": r["ppl"]["ppl"], "acc": r["mc"]["acc"], "acc_norm": r["mc"]["acc_norm"]}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from layerfold.calibration.calibrate import calibrate
    from layerfold.core.data import calib_batches

    torch.manual_seed(0)
    dense, tok = load(args.model)
    dense.requires_grad_(False)
    calib = calib_batches(tok, source=args.data, split="calib", n_samples=args.samples, seq_len=args.seq_len)
    t0 = time.perf_counter()
    stats = calibrate(dense, calib, window=1, cka=False, channels=False)
    lr = [float(v) for v in stats.cos_window[:, 0]]
    log(args, {"event": "calibrated", "seconds": time.perf_counter() - t0, "layer_redundancy": lr})
    prompt = calib[0, :16].tolist()
    max_len = len(prompt) + args.new_tokens + 8
    dense_dec = {dt: decoder(dense, DTYPES[dt], max_len) for dt in args.dtypes}
    dense_params = count_params(dense.spec)["total"]
    row = {"model": "dense", "target": 0.0, "sb": None, "params": dense_params, "params_kept": 1.0,
           **evaluate_model(dense, tok, args)}
    log(args, row)
    rows = [row]
    for target in args.targets:
        variants: list[tuple[str, float | None]] = [("constant", None)] + [("dynamic", sb) for sb in args.bases
                                                                           if sb <= target]
        for basis in args.basis:
            for kind, sb in variants:
                plan = make_plan(dense.spec, target, lr=lr if kind == "dynamic" else None, base=sb,
                                 round_to=args.round_to, keep_ends=not args.slice_ends, pca_tokens=args.pca_tokens,
                                 basis=basis)
                rows.append(one(args, dense, tok, calib, plan, kind, target, sb, dense_dec, prompt, dense_params))
    return rows


def one(args: argparse.Namespace, dense: Model, tok: Any, calib: torch.Tensor, plan: SlicePlan, kind: str,
        target: float, sb: float | None, dense_dec: dict[str, Any], prompt: list[int],
        dense_params: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    sliced, info = slice_model(dense, calib, plan, batch_size=8)
    row: dict[str, Any] = {"model": kind, "basis": plan.basis, "target": target, "sb": sb,
                           "slice_seconds": time.perf_counter() - t0,
                           "params": info["params"]["total"], "params_kept": info["params"]["total"] / dense_params,
                           "shortcut_params": info["params"]["shortcuts"], "widths": list(plan.widths[1::2])}
    row.update(evaluate_model(sliced, tok, args))
    max_len = len(prompt) + args.new_tokens + 8
    for dt in args.dtypes:
        d_ms, s_ms = time_pair(dense_dec[dt], decoder(sliced, DTYPES[dt], max_len), prompt, args.new_tokens,
                               args.repeats)
        row[f"dense_ms_{dt}"], row[f"ms_{dt}"], row[f"speedup_{dt}"] = d_ms, s_ms, d_ms / s_ms
    log(args, row)
    return row


def log(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")


def markdown(rows: list[dict[str, Any]], dtypes: list[str]) -> str:
    head = ["slicing", "basis", "target", "SB", "params kept", "val ppl", "val acc"]
    head += [h for dt in dtypes for h in (f"ms/tok {dt}", f"vs dense {dt}")]
    out = []
    for r in rows:
        name = "dense" if r["model"] == "dense" else ("constant (SliceGPT)" if r["model"] == "constant" else "dynamic")
        cells = [name, r.get("basis", "-"), f"{r['target']:.0%}" if r["target"] else "-",
                 "-" if r["sb"] is None else r["sb"],
                 f"{r['params'] / 1e6:.1f}M ({r['params_kept']:.1%})", round(r["ppl"], 2), round(r["acc"], 3)]
        for dt in dtypes:
            ms = r.get(f"ms_{dt}")
            if r["model"] == "dense":  # the dense model was timed beside every sliced one: their median
                ms = statistics.median([x[f"dense_ms_{dt}"] for x in rows if f"dense_ms_{dt}" in x] or [0]) or None
            cells += [round(ms, 1) if ms else "-", f"{r[f'speedup_{dt}']:.2f}x" if f"speedup_{dt}" in r else "-"]
        out.append(cells)
    return table(out, head)


# ---- rounding multiple microbenchmark ------------------------------------------------------------------
WIDTHS = range(416, 449)  # around 3/4 of SmolLM2's 576: every remainder mod 32, two multiples of 32, one of 64


def bench_widths(args: argparse.Namespace) -> None:
    """GEMVs (``--bench-tokens`` 1: decode) or GEMMs (prefill) of one sliced SmolLM2 layer for every kept
    width in WIDTHS: q|k|v, o, gate|up, down and both shortcuts. Widths are visited round-robin and each
    keeps its best time over ``--repeats`` rounds, so load from other processes on a shared machine hits
    every width alike. Reports ns per multiply-add by the largest power of two dividing the width. The
    products run as the runtime runs them: on oneDNN-packed weights where the runtime packs them."""
    from layerfold.inference.decode_net import can_pack, pack, packed_linear

    torch.manual_seed(0)
    d, ffn, qkv = 576, 1536, 960
    res: dict[str, dict[int, float]] = {}
    for dt in args.dtypes:
        dtype = DTYPES[dt]
        packed = can_pack(torch.device("cpu"), dtype)
        lin = packed_linear if packed else torch.nn.functional.linear
        cases = {}
        for w in WIDTHS:
            mats = [torch.randn(r, c, dtype=dtype) for r, c in ((qkv, w), (w, d), (w, w), (2 * ffn, w), (w, ffn),
                                                                  (w, w))]
            xs = [torch.randn(args.bench_tokens, m.shape[1], dtype=dtype) for m in mats]
            macs = args.bench_tokens * sum(m.numel() for m in mats)
            cases[w] = ([pack(m) for m in mats] if packed else mats, xs, macs)
        best = dict.fromkeys(WIDTHS, float("inf"))
        iters = 10 if args.bench_tokens == 1 else 1
        for _ in range(args.repeats):
            for w, (mats, xs, _) in cases.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    for m, x in zip(mats, xs, strict=True):
                        lin(x, m)
                best[w] = min(best[w], (time.perf_counter() - t0) / iters)
        res[dt] = {w: best[w] / cases[w][2] * 1e9 for w in WIDTHS}  # ns per MAC
    rows = []
    for v, label in enumerate(("odd", "2 mod 4", "4 mod 8", "8 mod 16", "16 mod 32", "32 (416, 448)")):
        ws = [w for w in WIDTHS if (w % (1 << v) == 0) and (v == 5 or w % (2 << v))]
        rows.append([label, len(ws)] + [round(statistics.median(res[dt][w] for w in ws), 4) for dt in args.dtypes])
    print(table(rows, ["width class", "widths"] + [f"ns/MAC {dt} (median)" for dt in args.dtypes]))
    log(args, {"event": "bench_widths", "tokens": args.bench_tokens, "ns_per_mac": res})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.25, 0.35])
    p.add_argument("--bases", type=float, nargs="*", default=[0.05, 0.1, 0.2],
                   help="slicing bases SB of the dynamic models (none: constant slicing only)")
    p.add_argument("--basis", nargs="+", default=["point"], choices=("point", "layer", "global"),
                   help="PCA bases to compare: per point (SliceGPT), per layer, one global")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--pca-tokens", default="all", choices=("all", "skip-first", "token-norm"))
    p.add_argument("--slice-ends", action="store_true", help="rotate/slice embeddings and head too (untied head)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--mc-items", type=int, default=300)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    p.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                   help="only print the table of earlier runs' --json files")
    p.add_argument("--bench-widths", action="store_true", help="only the rounding-multiple GEMV benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, available))")
    p.add_argument("--bench-tokens", type=int, default=1, help="rows per product in --bench-widths (1 = decode)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    if args.bench_widths:
        bench_widths(args)
        return 0
    if args.table:
        rows = [json.loads(line) for f in args.table for line in open(f)]
        rows = [r for r in rows if "model" in r]
        rows = [r for i, r in enumerate(rows) if r["model"] != "dense" or i == 0]  # one dense row
        rows.sort(key=lambda r: (r["target"], r.get("basis", "point") != "point", r["model"], r["sb"] or 0))
        print(markdown(rows, args.dtypes))
        return 0
    rows = run(args)
    print()
    print(markdown(rows, args.dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
