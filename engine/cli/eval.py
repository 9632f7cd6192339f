"""`layerfold eval MODEL`: perplexity and multiple-choice accuracy on held-out text."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerfold.cli.util import add_common, add_weights, emit, torch_dtype
from layerfold.core.console import table
from layerfold.core.data import PYDOC, SPLITS
from layerfold.core.loading import load
from layerfold.evaluation.evaluate import DEFAULT_MAX_TOKENS, DEFAULT_MC_ITEMS, TASKS, evaluate


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def _nonnegative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def _tasks(s: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in s.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or s!r}; choose from {','.join(TASKS)}")
    return tasks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and multiple-choice accuracy on held-out text",
        description="Evaluate a model on the validation split of a text source: perplexity over fixed windows "
                    "and a 4-way 'which text comes next' multiple-choice task (acc, acc_norm as lm-eval-harness "
                    "defines them). Same data for every model, so dense and pruned numbers compare directly.")
    add_common(p)
    add_weights(p)
    p.add_argument("--data", default=PYDOC, metavar="pydoc|FILE",
                   help="text source: 'pydoc' (built-in Python documentation), a .txt file, a .jsonl file of "
                        "{\"text\": ...} lines, or a .jsonl file of {\"context\", \"choices\", \"label\"} "
                        "multiple-choice items (mc task only); default pydoc")
    p.add_argument("--split", default="val", choices=SPLITS,
                   help="part of the source to evaluate on (documents are assigned calib/val by a stable hash); "
                        "default val")
    p.add_argument("--task", default=",".join(TASKS), type=_tasks, metavar="ppl,mc",
                   help="comma-separated tasks: ppl (perplexity), mc (multiple-choice accuracy); default ppl,mc")
    p.add_argument("--seq-len", type=_positive, default=512,
                   help="perplexity window length in tokens (non-overlapping windows); default 512")
    p.add_argument("--max-tokens", type=_nonnegative, default=DEFAULT_MAX_TOKENS,
                   help="perplexity reads at most this many tokens of the split, 0 = all (pydoc val: ~18K); "
                        "default %(default)s")
    p.add_argument("--mc-items", type=_positive, default=DEFAULT_MC_ITEMS,
                   help="number of multiple-choice items (pydoc val holds at most ~450); the standard error of acc "
                        "is about 0.045 at 100 items; default %(default)s")
    p.add_argument("--batch-size", type=_positive, default=8,
                   help="windows per forward pass for perplexity (mc: twice as many short sequences); default 8")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data != PYDOC and not Path(args.data).is_file():  # before the model load, not after it
        raise FileNotFoundError(f"{args.data}: no such file. Fix: use --data pydoc (built-in text) or the path of "
                                "a .txt or .jsonl file")
    from layerfold.evaluation.streamed import evaluation_model, weight_bytes, weights_place

    dtype = torch_dtype(args.dtype)
    place, why = weights_place(args.weights, args.device, lambda: weight_bytes(args.model, dtype))
    model, tok = load(args.model, device="cpu" if place == "host" else args.device, dtype=dtype, quiet=args.json,
                      allow_nonfinite=args.allow_nonfinite)
    res = evaluate(evaluation_model(model, args.device, place), tok, data=args.data, tasks=args.task,
                   seq_len=args.seq_len,
                   max_tokens=args.max_tokens or None, mc_items=args.mc_items, batch_size=args.batch_size,
                   split=args.split, progress=not args.json)
    n_params = model.num_params()
    from layerfold.core.extras import package_versions

    obj = {"model": args.model, "params": n_params, "device": args.device, "dtype": args.dtype,
           "weights": {"place": place, "why": why},
           "settings": {"seq_len": args.seq_len, "max_tokens": args.max_tokens, "mc_items": args.mc_items,
                        "batch_size": args.batch_size}, **res, "versions": package_versions()}
    ppl, mc = res.get("ppl", {}), res.get("mc", {})
    nan = float("nan")
    row = [args.model, f"{n_params / 1e6:.1f}M", ppl.get("ppl", nan), mc.get("acc", nan), mc.get("acc_norm", nan),
           ppl.get("tokens", "-"), mc.get("n", "-"), round(res["seconds"], 1)]
    text = table([row], ["model", "params", "ppl", "acc", "acc_norm", "tokens", "mc items", "seconds"])
    emit(args, obj, text)
    return 0
