"""Throughput of the calibration-statistics kernels against their torch references, same inputs.

On CUDA: each Triton launcher and its ``*_ref`` timed with ``triton.testing.do_bench`` (median and
20th-80th percentile of the kernel time; the first call, which includes JIT compilation, is timed
apart). Reports GB/s of input read (the bytes each statistic must read at least once: activations
and the padding mask) and, for the matmul-shaped kernels (Gram, U-centred Gram, HSIC), TFLOP/s of
the useful multiply-adds (2 N d^2 for X^T X even though the kernel computes only the upper
triangle), each also as a fraction of the device peaks given on the command line.

On CPU the Triton kernels cannot run compiled (they need CUDA; the interpreter is for testing,
not timing), so only the torch references are timed and reported.

    python bench/bench_kernels.py --json runs/bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)
import torch

from layerfold import kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    name: str
    shape: str
    run: Callable[[], object]  # the Triton launcher on the inputs
    ref: Callable[[], object]  # the torch reference on the same inputs
    bytes_read: int
    flops: float  # 0 for the bandwidth-bound reductions
    tensor_cores: bool  # whether the matmul may use tensor cores (fp16/bf16 inputs)


@dataclass
class Row:
    kernel: str
    impl: str  # "triton" | "torch_ref"
    shape: str
    dtype: str
    device: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    first_call_ms: float  # includes Triton JIT compilation for the first launch of a shape
    gb_per_s: float
    tflop_per_s: float | None
    frac_peak_bw: float
    frac_peak_flops: float | None


def _mask(n: int, device: torch.device, valid: float = 0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, generator=g) < valid).to(device)


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    dt = DTYPES[args.dtype]
    es = torch.empty((), dtype=dt).element_size()
    n, d, c, k, m, n_layers = args.tokens, args.hidden, args.ffn, args.window, args.cka_tokens, args.layers
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device).to(dt)

    x, mask = rnd(n, d), _mask(n, device)
    others = rnd(k, n, d)
    gate, up = rnd(n, c), rnd(n, c)
    xs_cka = rnd(m, d)
    grams = torch.stack([kernels.ucentered_gram_ref(rnd(m, d)) for _ in range(n_layers)])
    gram_acc = (torch.zeros(d, d, device=device), torch.zeros(d, device=device), torch.zeros(d, device=device))
    tc = dt != torch.float32
    return [
        Case("gram_accumulate", f"N={n} d={d}",
             lambda: kernels.gram_accumulate(x, mask, gram_acc),
             lambda: kernels.gram_accumulate_ref(x, mask, gram_acc),
             n * d * es + n, 2.0 * n * d * d, tc),
        Case("cosine_window_sum", f"N={n} d={d} K={k}",
             lambda: kernels.cosine_window_sum(x, others, mask),
             lambda: kernels.cosine_window_sum_ref(x, others, mask),
             (k + 1) * n * d * es + n, 0.0, False),
        Case("channel_stats", f"N={n} C={c}",
             lambda: kernels.channel_stats(gate, mask),
             lambda: kernels.channel_stats_ref(gate, mask),
             n * c * es + n, 0.0, False),
        Case("swiglu_channel_stats", f"N={n} C={c}",
             lambda: kernels.swiglu_channel_stats(gate, up, mask),
             lambda: kernels.swiglu_channel_stats_ref(gate, up, mask),
             2 * n * c * es + n, 0.0, False),
        Case("ucentered_gram", f"m={m} d={d}",
             lambda: kernels.ucentered_gram(xs_cka),
             lambda: kernels.ucentered_gram_ref(xs_cka),
             m * d * es, 2.0 * m * m * d, tc),
        Case("hsic_accumulate", f"L={n_layers} m={m}",
             lambda: kernels.hsic_accumulate(grams),
             lambda: kernels.hsic_accumulate_ref(grams),
             n_layers * m * m * 4, 2.0 * n_layers * n_layers * m * m, False),  # grams are fp32
        Case("hsic_row_accumulate", f"L={n_layers} m={m}",
             lambda: kernels.hsic_row_accumulate(grams[-1], grams),
             lambda: kernels.hsic_row_accumulate_ref(grams[-1], grams),
             (n_layers + 1) * m * m * 4, 0.0, False),
    ]


def _time_cuda(fn: Callable[[], object]) -> tuple[float, float, float, float]:
    import triton.testing

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80, first


def _time_cpu(fn: Callable[[], object], reps: int) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3], first


def _row(case: Case, impl: str, timing: tuple[float, float, float, float], args: argparse.Namespace,
         device: str) -> Row:
    med, p20, p80, first = timing
    gbs = case.bytes_read / (med * 1e-3) / 1e9
    tflops = case.flops / (med * 1e-3) / 1e12 if case.flops else None
    peak_flops = args.peak_flops_tensor if case.tensor_cores else args.peak_flops_fp32
    return Row(case.name, impl, case.shape, args.dtype, device, med, p20, p80, first, gbs, tflops,
               gbs * 1e9 / args.peak_bw, tflops * 1e12 / peak_flops if tflops is not None else None)


def _print_table(rows: list[Row]) -> None:
    head = f"{'kernel':<22}{'impl':<10}{'shape':<20}{'median ms':>10}{'p20-p80 ms':>17}{'1st ms':>9}" \
           f"{'GB/s':>9}{'%bw':>6}{'TFLOP/s':>9}{'%flop':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tf = f"{r.tflop_per_s:9.3g}" if r.tflop_per_s is not None else f"{'-':>9}"
        fp = f"{100 * r.frac_peak_flops:6.1f}%" if r.frac_peak_flops is not None else f"{'-':>7}"
        print(f"{r.kernel:<22}{r.impl:<10}{r.shape:<20}{r.ms_median:10.3f}"
              f"{f'{r.ms_p20:.3f}-{r.ms_p80:.3f}':>17}{r.first_call_ms:9.1f}{r.gb_per_s:9.3g}"
              f"{100 * r.frac_peak_bw:5.1f}%{tf}{fp}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the rows as JSON to this file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--tokens", type=int, default=None, help="tokens N (default 16384 on CUDA, 2048 on CPU)")
    p.add_argument("--hidden", type=int, default=576, help="residual width d (SmolLM2-135M: 576)")
    p.add_argument("--ffn", type=int, default=1536, help="FFN width C (SmolLM2-135M: 1536)")
    p.add_argument("--window", type=int, default=8, help="others K for cosine_window_sum")
    p.add_argument("--cka-tokens", type=int, default=None, help="tokens per CKA batch m (default 512; CPU 256)")
    p.add_argument("--layers", type=int, default=30, help="layers L for the HSIC matrix")
    p.add_argument("--reps", type=int, default=5, help="timed repeats on CPU (CUDA uses do_bench)")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="device memory bandwidth, B/s (H100 SXM)")
    p.add_argument("--peak-flops-tensor", type=float, default=989e12,
                   help="dense tensor-core FLOP/s for fp16/bf16 operands (H100 SXM: 989e12)")
    p.add_argument("--peak-flops-fp32", type=float, default=67e12,
                   help="fp32 non-tensor-core FLOP/s, the roof for ieee-precision fp32 tl.dot (H100 SXM: 67e12)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.tokens = args.tokens or (16384 if cuda else 2048)
    args.cka_tokens = args.cka_tokens or (512 if cuda else 256)
    if args.cka_tokens < 4:
        p.error("--cka-tokens must be at least 4 (unbiased HSIC)")
    if cuda and kernels._dispatch.interpreted(kernels.gram._gram_kernel):
        p.error("triton was imported with TRITON_INTERPRET=1: the kernels would run in the CPU interpreter; "
                "unset it (env -u TRITON_INTERPRET python bench/bench_kernels.py ...)")
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {dev_name}; dtype {args.dtype}; peaks: {args.peak_bw / 1e12:.2f} TB/s, "
          f"{args.peak_flops_tensor / 1e12:.0f} TFLOP/s tensor, {args.peak_flops_fp32 / 1e12:.0f} TFLOP/s fp32")
    if not cuda:
        print("No CUDA device: the Triton kernels need CUDA to run compiled, so only the torch references "
              "are timed here (peak fractions are against the GPU peaks given, for scale only).")

    rows: list[Row] = []
    for case in build_cases(args, device):
        if cuda:
            rows.append(_row(case, "triton", _time_cuda(case.run), args, dev_name))
            rows.append(_row(case, "torch_ref", _time_cuda(case.ref), args, dev_name))
        else:
            rows.append(_row(case, "torch_ref", _time_cpu(case.ref, args.reps), args, dev_name))
    _print_table(rows)
    if cuda:
        print("\nspeed-up of triton over torch_ref (median):")
        for t, r in zip(rows[::2], rows[1::2], strict=True):
            print(f"  {t.kernel:<22}{r.ms_median / t.ms_median:6.2f}x")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {"device": dev_name, "cuda": cuda, "args": meta, "rows": [asdict(r) for r in rows]}
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(args.json)  # atomic: never a half-written file
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
