"""Calibration benchmarks: peak memory against the naive approach, and the cost of the statistics.

(a) memory: for n and 4n calibration sequences, each configuration in its own subprocess:
    - layerfold: ``layerfold.calibration.calibrate`` (layer by layer, weights mmap'd, one micro-batch at a time);
    - naive: HF transformers ``output_hidden_states=True`` over the whole set, every hidden state kept,
      window cosines and CKA computed afterwards.
    Reported: peak RSS over the process's resident size before the run (VmHWM after resetting it via
    /proc/self/clear_refs), the sampled peak of private (anonymous) memory, and for layerfold that peak
    minus its hidden-state/ring/CKA buffers (the working memory, which should stay flat while the naive
    peak grows with the tokens). glibc is told to serve blocks >= 64 KiB by mmap in the workers, so
    freed memory leaves the RSS at once and the peaks are live data, not allocator caches.
(b) time: the same layer-by-layer loop with no statistics (window=0, no CKA, no channels) against the
    default statistics (W=8 cosines, CKA, channel magnitudes) and against +Grams, interleaved repeats,
    median wall and process-CPU seconds. Target: default statistics <= 15% over the plain loop.

    python bench/bench_calibration.py --samples 8 --seq-len 256 --threads 1 [--json] [--part memory|time]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)

STATS_ON = dict(window=8, cka=True, channels=True)
STATS_OFF = dict(window=0, cka=False, channels=False)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _data(model: str, samples: int, seq_len: int) -> tuple[Path, torch.Tensor]:
    from layerfold.core.data import calib_batches
    from layerfold.core.loading import load_tokenizer, resolve

    path = resolve(model, quiet=True)
    return path, calib_batches(load_tokenizer(path), "pydoc", n_samples=samples, seq_len=seq_len)


def _naive(path: Path, ids: torch.Tensor, micro_batch: int) -> None:
    """What a user does without layerfold: all hidden states of the set, then the statistics."""
    import transformers

    from layerfold import load_spec_state
    from layerfold.core.arch import hf_config_from_spec, state_to_hf
    from layerfold.kernels import cka_from_hsic, hsic_accumulate_ref, ucentered_gram_ref

    spec, state, _ = load_spec_state(path, quiet=True)
    cfg = transformers.AutoConfig.for_model(**hf_config_from_spec(spec))
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    hf.load_state_dict(state_to_hf(dict(state), spec), strict=False)
    with torch.inference_mode():
        per_batch = [hf.model(ids[b:b + micro_batch], output_hidden_states=True).hidden_states
                     for b in range(0, ids.shape[0], micro_batch)]
        hs = [torch.cat(x) for x in zip(*per_batch, strict=True)]  # L + 1 tensors (n, T, d)
        del per_batch
        for j in range(spec.n_layers):
            for k in range(1, 9):
                if j + k <= spec.n_layers:
                    torch.nn.functional.cosine_similarity(hs[j], hs[j + k], dim=-1).mean()
        hsic = None
        for s in range(ids.shape[0]):
            grams = torch.stack([ucentered_gram_ref(h[s, ::2]) for h in hs])
            hsic = hsic_accumulate_ref(grams, hsic)
        cka_from_hsic(hsic)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path, ids = _data(args.model, args.samples, args.seq_len)
    import transformers  # noqa: F401  (both sides pay the import before the baseline)

    from layerfold.calibration.calibrate import calibrate  # imported before the baseline is taken

    base, base_anon = _status("VmRSS"), _status("RssAnon")
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs). Fix: run on Linux >= 4.0")
    peak_anon = [base_anon]
    done = threading.Event()

    def sample() -> None:  # RssAnon has no kernel-kept peak: sample it
        while not done.wait(0.002):
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    info: dict[str, Any] = {"mode": args.worker, "samples": args.samples, "tokens": ids.numel()}
    if args.worker == "layerfold":
        st = calibrate(path, ids, micro_batch=args.micro_batch, cka_tokens=args.seq_len // 2, **STATS_ON)
        info["buffers"] = sum(st.meta["buffer_bytes"].values())
    else:
        _naive(path, ids, args.micro_batch)
    info["time_s"] = time.perf_counter() - t
    done.set()
    th.join()
    info["peak_delta"] = _status("VmHWM") - base
    info["peak_anon_delta"] = peak_anon[0] - base_anon
    return info


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in (args.samples, 4 * args.samples):
        for mode in ("layerfold", "naive"):
            cmd = [sys.executable, __file__, "--worker", mode, "--samples", str(n), "--seq-len", str(args.seq_len),
                   "--threads", str(args.threads), "--micro-batch", str(args.micro_batch), "--model", args.model]
            # large blocks straight from mmap: freed memory leaves the RSS at once, so the peak is live data
            env = {**os.environ, "TRITON_INTERPRET": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if res.returncode:
                raise RuntimeError(f"{mode} n={n} failed:\n{res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {mode:9s} n={n}: peak +{rows[-1]['peak_delta'] / 2**20:.0f} MiB", file=sys.stderr)
    return rows


def timing(args: argparse.Namespace) -> dict[str, Any]:
    from layerfold.calibration.calibrate import calibrate

    torch.set_num_threads(args.threads)
    path, ids = _data(args.model, args.samples, args.seq_len)
    configs = {"plain": STATS_OFF, "stats": STATS_ON, "stats+grams": {**STATS_ON, "grams": True}}
    calibrate(path, ids[:2], micro_batch=args.micro_batch, **STATS_ON)  # warm-up: page in the weights
    wall: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    split: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, kw in configs.items():  # interleaved: a slow spell on the shared machine hits all alike
            t, c = time.perf_counter(), time.process_time()
            st = calibrate(path, ids, micro_batch=args.micro_batch, **kw)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            sp = st.meta["time_split_s"]  # inside the run: statistics time over the layers' forward time
            split[name].append(sp["statistics"] / sp["forward"])
    med = {k: {"wall_s": statistics.median(v), "cpu_s": statistics.median(cpu[k]), "wall_all": v,
               "stats_over_forward": statistics.median(split[k])} for k, v in wall.items()}
    for k in configs:
        if k != "plain":
            med[k]["overhead_wall"] = med[k]["wall_s"] / med["plain"]["wall_s"] - 1
            med[k]["overhead_cpu"] = med[k]["cpu_s"] / med["plain"]["cpu_s"] - 1
    med["tokens"] = ids.numel()
    med["tokens_per_s_plain"] = ids.numel() / med["plain"]["wall_s"]
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=8, help="n for the memory test (n and 4n); sequences for timing")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--part", choices=("memory", "time", "all"), default="all")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=("layerfold", "naive"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    out: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "threads": args.threads}
    if args.part in ("memory", "all"):
        out["memory"] = memory(args)
    if args.part in ("time", "all"):
        out["time"] = timing(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from layerfold.core.console import human_bytes, table

    if "memory" in out:
        rows = [[r["mode"], r["samples"], r["tokens"], human_bytes(r["peak_delta"]), human_bytes(r["peak_anon_delta"]),
                 human_bytes(r["buffers"]) if "buffers" in r else "-",
                 human_bytes(r["peak_anon_delta"] - r["buffers"]) if "buffers" in r else "-", f"{r['time_s']:.1f}"]
                for r in out["memory"]]
        print("(a) peak memory over the pre-run baseline. RSS includes the weights (layerfold: mmap'd file pages, "
              "reclaimable; naive: the HF model in anonymous memory); anon = process-private memory")
        print(table(rows, ["approach", "samples", "tokens", "peak RSS", "peak anon", "buffers", "anon - buffers",
                           "time s"]))
    if "time" in out:
        t = out["time"]
        rows = [[k, f"{t[k]['wall_s']:.2f}", f"{t[k]['cpu_s']:.2f}",
                 f"{100 * t[k]['overhead_wall']:+.1f}%" if "overhead_wall" in t[k] else "-",
                 f"{100 * t[k]['overhead_cpu']:+.1f}%" if "overhead_cpu" in t[k] else "-",
                 f"{100 * t[k]['stats_over_forward']:.1f}%"]
                for k in ("plain", "stats", "stats+grams")]
        print(f"\n(b) statistics cost, {t['tokens']} tokens, {args.threads} thread(s), median of {args.repeats}; "
              f"plain loop {t['tokens_per_s_plain']:.0f} tokens/s")
        print(table(rows, ["loop", "wall s", "cpu s", "extra wall", "extra cpu", "stats/forward in run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
