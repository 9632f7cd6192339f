"""`layerfold serve MODEL`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys
from pathlib import Path

from layerfold.cli.util import add_common, parse_sizes, torch_dtype
from layerfold.core.extras import require


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL with FastAPI + uvicorn: POST /v1/completions and "
                       "/v1/chat/completions (stream: true gives server-sent events), GET /v1/models, /health and "
                       "/metrics (Prometheus). "
                       "Concurrent requests share decode steps (continuous batching): up to --max-batch requests "
                       "generate together, up to --max-queue more wait for a free slot.")
    add_common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients pass and /v1/models lists (default: MODEL's directory name or alias)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (cache rows; default 16)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="context per request, prompt + completion tokens (cache slots per row; default 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default max-len - 1); longer ones answer 400")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default max-len - 1); larger answers 400")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a free slot (default 64); more answer 429")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CPU: faster decoding after about a minute of compiling "
                   "at start-up)")
    p.add_argument("--static-batches", default="", metavar="N,N",
                   help="with --compile: batch sizes that get their own autotuned graph, e.g. 4,16 (about a "
                   "minute more of compiling each; default none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for decode steps and prefills (default: decode on one fewer than the "
                   "cores, at least 1, leaving a core to the HTTP side, and prefill on all; OMP_NUM_THREADS, when "
                   "set, is kept). Decoding on every core may pay when many clients "
                   "share large batches (docs/PERFORMANCE.md, serving)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB (default 4); larger ones answer 413 before they are read whole")
    p.add_argument("--max-prompts", type=int, default=64,
                   help="sequences one request may run: its prompts times n (default 64)")
    p.add_argument("--api-key", default=os.environ.get("LAYERFOLD_API_KEY"),
                   help="require \"Authorization: Bearer KEY\" on every endpoint but /health (default: "
                   "$LAYERFOLD_API_KEY; none: no key)")
    p.add_argument("--cors-origins", default="", metavar="URL,URL",
                   help="origins a browser page may call the API from, comma-separated, or * for any "
                   "(default none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=run)


def check_serve_args(args: argparse.Namespace) -> None:
    """Every option checked before the model loads (a bad port must not cost a model load first)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (1..65535). Fix: pass e.g. --port 8000")
    for name in ("max_batch", "max_len", "max_queue", "max_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive. Fix: pass a "
                             "positive number")
    if not 0 < args.max_body_mb < 2 ** 20:  # NaN and inf too (inf died converting to bytes after the load)
        raise ValueError(f"--max-body-mb {args.max_body_mb} must be a positive number of MiB below 2**20. Fix: e.g. "
                         "--max-body-mb 4")
    cpus = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cpus:  # 10**5 threads crashed torch (SIGSEGV)
        raise ValueError(f"--threads {args.threads}: this machine has {cpus} CPUs. Fix: pass a thread count from 1 "
                         f"to {cpus}, or leave it out")
    check_cors_origins(args.cors_origins)
    for name in ("max_prompt_tokens", "max_tokens_limit"):
        v = getattr(args, name)
        if v is not None and not 1 <= v < args.max_len:
            raise ValueError(f"--{name.replace('_', '-')} {v} must lie in 1..{args.max_len - 1} (below --max-len). "
                             "Fix: pass a smaller value or leave it out")
    if args.max_len < 2:
        raise ValueError(f"--max-len {args.max_len}: a request needs a prompt token and a slot to generate into. "
                         "Fix: pass --max-len 2 or more (default 1024)")
    if args.api_key is not None and (not args.api_key.strip() or args.api_key.strip() != args.api_key):
        raise ValueError("--api-key is empty or has leading or trailing spaces. Fix: pass the key without them")
    check_listen(args.host, args.port)


def check_listen(host: str, port: int) -> None:
    """Bind ``host``:``port`` once, as uvicorn will: a ValueError naming what is wrong (the host, or the port) and
    the fix. An empty host would listen on every interface: refused (0.0.0.0 says so on purpose)."""
    if not host.strip() or host != host.strip():
        raise ValueError(f"--host {host!r} is empty or has spaces. Fix: pass --host 127.0.0.1 (this machine only) or "
                         "--host 0.0.0.0 (every interface, to serve other machines)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except socket.gaierror as e:  # not an address or a name that resolves
            raise ValueError(f"--host {host!r} is not an address of this machine ({e.strerror or e}). Fix: pass an IP "
                             "address or host name alone (no scheme, port or brackets), e.g. 127.0.0.1, ::1 or "
                             "0.0.0.0") from None
        except OSError as e:
            why = {errno.EADDRINUSE: f"port {port} is in use (another server holds it). Fix: choose another --port",
                   errno.EACCES: f"port {port} needs more privileges. Fix: choose a --port above 1023",
                   errno.EADDRNOTAVAIL: f"{host} is not an address of this machine. Fix: pass one of its addresses, "
                                        "e.g. --host 127.0.0.1 or 0.0.0.0"}.get(e.errno)
            raise ValueError(f"cannot listen on {host}:{port}: " + (why or f"{e.strerror or e}. Fix: choose another "
                             "--port, or a --host address of this machine")) from None


def check_cors_origins(text: str) -> None:
    """--cors-origins: * or origins as browsers send them (scheme://host[:port], no path, no trailing slash): any
    other spelling never matches a browser's Origin header, so CORS would be silently off."""
    for o in (o.strip() for o in text.split(",") if o.strip()):
        if o != "*" and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s]+", o):
            raise ValueError(f"--cors-origins: {o!r} is not an origin (scheme://host[:port], no path or trailing "
                             "slash). Fix: e.g. --cors-origins http://localhost:3000,https://app.example.com, or *")


def check_tokenizer(src: str) -> None:
    """The model's tokenizer read and tried on a sentence before the weights load: a model without one, or with the
    tokenizer files of another model (ids past its vocabulary: every request would answer 400), is refused."""
    from layerfold.core.loading import load_spec_state, load_tokenizer, resolve

    path = resolve(src)  # an alias or GGUF file is converted here (once, cached), saying so
    vocab = load_spec_state(path, quiet=True)[0].vocab_size
    ids = load_tokenizer(path)("The quick brown fox jumps over the lazy dog. def f(x): return x")["input_ids"]
    if ids and max(ids) >= vocab:
        raise ValueError(f"{src}: its tokenizer gives token id {max(ids)}, past the model's vocabulary of {vocab}. "
                         "Fix: copy the tokenizer files of the model it came from into it")


def run(args: argparse.Namespace) -> int:
    require("serve", "layerfold serve")
    import torch

    from layerfold.core.loading import load
    from layerfold.serving.server import serve, serving_threads

    check_serve_args(args)
    static = parse_sizes(args.static_batches, "--static-batches", empty=True, example="4,16")
    if static and not args.compile:
        raise ValueError("--static-batches gives batch sizes graphs of their own in the compiled runtime. Fix: add "
                         "--compile, or drop --static-batches")
    outside = [b for b in static if not 2 <= b <= args.max_batch]
    if outside:  # the runtime refused them only after the model load
        raise ValueError(f"--static-batches {','.join(map(str, outside))}: a static batch lies in 2..{args.max_batch} "
                         "(--max-batch). Fix: drop those sizes, or raise --max-batch")
    threads, prefill_threads = serving_threads(args.threads, args.device)
    check_tokenizer(args.model)
    torch.set_num_threads(threads)  # before anything compiles: inductor's CPU kernels keep their thread count
    model, tok = load(args.model, device=args.device, dtype=torch_dtype(args.dtype),
                      allow_nonfinite=args.allow_nonfinite)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer. Fix: serve a model directory that includes one")
    name = args.model_name or Path(str(args.model).rstrip("/")).name
    max_len = min(args.max_len, model.spec.max_position)  # the context requests really get, as the banner says
    ctx = f"context {max_len}" + (" = all the model's positions" if max_len < args.max_len else "")
    print(f"[layerfold] serving {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, {ctx}, "
          f"{threads} CPU thread{'s' * (threads > 1)})", file=sys.stderr, flush=True)
    if args.compile:
        print("[layerfold] compiling the decode step first (1-3 min on a 2-core CPU, about 1 more per static "
              "batch); the port opens when it is done", file=sys.stderr, flush=True)
    serve(model, tok, host=args.host, port=args.port, model_name=name, log_level=args.log_level,
          max_batch=args.max_batch, max_len=max_len,
          max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
          compile=args.compile, static_batches=static, prefill_threads=prefill_threads,
          max_body_bytes=int(args.max_body_mb * 2 ** 20), max_prompts=args.max_prompts, api_key=args.api_key or None,
          cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()])
    return 0
