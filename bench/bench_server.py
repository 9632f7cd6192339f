"""Throughput of `layerfold serve` with 1, 4 and 16 concurrent clients, on loopback only.

    python bench/bench_server.py [MODEL] [--dtype bf16] [--clients 1,4,16] [--requests 2] [--max-tokens 64]
                                 [--timeout 600] [--threads N] [--compile [--static-batches 4,16]]
                                 [--process] [--json]

Starts the server in-process on a free 127.0.0.1 port (the same app `layerfold serve` runs; with
--process, `layerfold serve` itself in a child process, so that the clients' Python does not share
the server's interpreter lock, as in a real deployment), then for
each concurrency level C runs C client threads with the official `openai` client, each sending
``--requests`` streamed chat completions in a row (greedy, at most ``--max-tokens`` each; a reply
may end earlier at EOS, and the token counts come from the server's usage report). Reports
aggregate completion tokens/s, requests/s, time to first token and per-request latency (median and
p95), and the largest batch the scheduler formed. Bounded: every request has a timeout, and the
whole run a deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import checkout  # noqa: E402,F401  (layerfold from this checkout when it is not installed)
import torch

QUESTIONS = ["What is the capital of France?", "Explain what a hash table is.", "Write a short poem about rain.",
             "How do I reverse a list in Python?", "Why is the sky blue?", "Give three tips for better sleep.",
             "What does HTTP stand for?", "Summarise the plot of Hamlet."]


def start_server(model: Any, tok: Any, max_batch: int, compile: bool,
                 static_batches: list[int] | None = None, prefill_threads: int | None = None) -> tuple[str, Any, Any]:
    import uvicorn

    from layerfold.serving.server import create_app

    app = create_app(model, tok, model_name="bench", max_batch=max_batch, max_len=512, compile=compile,
                     static_batches=static_batches or (), prefill_threads=prefill_threads)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", srv, app.state.scheduler


def start_process(args: argparse.Namespace, max_batch: int, timeout: float) -> tuple[str, Any]:
    """`layerfold serve` in a child process on a free loopback port; returns (base URL, process) once
    /health answers."""
    import subprocess
    import urllib.request

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "engine", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "bench", "--max-batch", str(max_batch), "--max-len", "512", "--dtype", args.dtype,
           "--log-level", "warning"]
    cmd += ["--compile"] if args.compile else []
    cmd += ["--static-batches", args.static_batches] if args.static_batches else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return f"http://127.0.0.1:{port}/v1", proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def max_rows(base: str, sched: Any) -> int:
    """The largest decode batch the scheduler formed so far (in-process, or from the server's /health)."""
    if sched is not None:
        return int(sched.max_rows_in_step)
    return int(health(base)["max_rows_in_step"])


def health(base: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.load(r)


def one_client(base: str, idx: int, requests: int, max_tokens: int, timeout: float) -> list[dict[str, float]]:
    import openai

    c = openai.OpenAI(base_url=base, api_key="unused", timeout=timeout, max_retries=0)
    out = []
    for r in range(requests):
        q = QUESTIONS[(idx + r) % len(QUESTIONS)]
        t0 = time.perf_counter()
        first, n = None, 0
        for ch in c.chat.completions.create(model="bench", messages=[{"role": "user", "content": q}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
            if ch.choices and ch.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if ch.usage is not None:
                n = ch.usage.completion_tokens
        t1 = time.perf_counter()
        out.append({"latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "tokens": n})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default 2)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600, help="deadline for the whole run, seconds")
    ap.add_argument("--compile", action="store_true", help="serve with the torch.compile'd decode step")
    ap.add_argument("--static-batches", default="", help="with --compile: batch sizes with a graph of their own, "
                    "e.g. 4,16 (see Runtime)")
    ap.add_argument("--process", action="store_true",
                    help="run `layerfold serve` in a child process (default: in this process, on a thread)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the server (default: `layerfold serve`'s, one fewer than the cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from layerfold.cli.util import parse_sizes
    from layerfold.core.loading import load
    from layerfold.serving.server import serving_threads

    levels = parse_sizes(args.clients, "--clients")
    t0 = time.perf_counter()
    static = parse_sizes(args.static_batches, "--static-batches", empty=True, example="4,16")
    if args.process:
        (base, proc), srv, sched = start_process(args, max(levels), args.timeout), None, None
    else:
        threads, prefill_threads = serving_threads(args.threads)  # as `layerfold serve` does
        torch.set_num_threads(threads)
        model, tok = load(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, quiet=True)
        base, srv, sched = start_server(model, tok, max_batch=max(levels), compile=args.compile,
                                        static_batches=static, prefill_threads=prefill_threads)
    startup = time.perf_counter() - t0
    one_client(base, 0, 1, 4, args.timeout)  # warm-up
    deadline = time.time() + args.timeout
    results = []
    for c in levels:
        if sched is not None:
            sched.max_rows_in_step = 0  # per level (the child process's count only grows; levels ascend)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as ex:
            futs = [ex.submit(one_client, base, i, args.requests, args.max_tokens, max(1.0, deadline - time.time()))
                    for i in range(c)]
            runs = [r for f in futs for r in f.result(timeout=max(1.0, deadline - time.time()))]
        wall = time.perf_counter() - t0
        lat = sorted(r["latency_s"] for r in runs)
        toks = sum(r["tokens"] for r in runs)
        results.append({"clients": c, "requests": len(runs), "completion_tokens": toks, "wall_s": wall,
                        "tokens_per_s": toks / wall, "requests_per_s": len(runs) / wall,
                        "ttft_median_s": statistics.median(r["ttft_s"] for r in runs),
                        "latency_median_s": statistics.median(lat),
                        "latency_p95_s": lat[max(0, math.ceil(0.95 * len(lat)) - 1)],
                        "max_batch_formed": max_rows(base, sched)})
    threads = health(base)["threads"]
    if args.process:
        proc.terminate()
        proc.wait(timeout=30)
    else:
        srv.should_exit = True
    out = {"model": args.model, "dtype": args.dtype, "threads": threads, "max_tokens": args.max_tokens,
           "compiled": args.compile, "static_batches": static, "server_process": args.process, "startup_s": startup,
           "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    n = out["threads"]
    print(f"{args.model} {args.dtype}, {n} thread{'s' * (n > 1)}, {'compiled' if args.compile else 'eager'} runtime"
          f"{' in a child process' if args.process else ''}"
          f"{' (own graphs at batch ' + args.static_batches + ')' if static else ''} "
          f"(start-up {startup:.0f} s), {args.requests} streamed chat requests per client, max_tokens "
          f"{args.max_tokens}, greedy")
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'req/s':>6} {'TTFT p50':>9} "
          f"{'lat p50':>8} {'lat p95':>8} {'batch':>5}")
    for r in results:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['completion_tokens']:>7} {r['tokens_per_s']:>8.1f} "
              f"{r['requests_per_s']:>6.2f} {r['ttft_median_s']:>8.2f}s {r['latency_median_s']:>7.2f}s "
              f"{r['latency_p95_s']:>7.2f}s {r['max_batch_formed']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
