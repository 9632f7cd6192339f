"""`layerfold eval MODEL`: perplexity and multiple-choice accuracy on held-out text."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerfold.cli.util import add_common, add_weights, count_arg, emit, torch_dtype
from layerfold.core.console import table
from layerfold.core.data import PYDOC, SPLITS, token_stream
from layerfold.core.loading import load, load_spec_state, load_tokenizer, resolve
from layerfold.evaluation.evaluate import DEFAULT_MAX_TOKENS, DEFAULT_MC_ITEMS, TASKS, check_eval_data, evaluate


def _tasks(s: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in s.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or s!r}. Fix: choose from {','.join(TASKS)}, "
                                         "e.g. --task ppl,mc")
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
    p.add_argument("--seq-len", type=count_arg(2), default=512,
                   help="perplexity window length in tokens (non-overlapping windows); default 512")
    p.add_argument("--max-tokens", type=count_arg(0), default=DEFAULT_MAX_TOKENS,
                   help="perplexity reads at most this many tokens of the split, 0 = all (pydoc val: ~18K); "
                        "default %(default)s")
    p.add_argument("--mc-items", type=count_arg(1), default=DEFAULT_MC_ITEMS,
                   help="number of multiple-choice items (pydoc val holds at most ~450); the standard error of acc "
                        "is about 0.045 at 100 items; default %(default)s")
    p.add_argument("--batch-size", type=count_arg(1), default=8,
                   help="windows per forward pass for perplexity (mc: twice as many short sequences); default 8")
    p.set_defaults(func=run)


def check_before_load(args: argparse.Namespace) -> None:
    """The data and the window checked against the model's spec and tokenizer (no weight read): a missing or too
    short --data, or a --seq-len past the model's context, must not cost a model load first."""
    if args.data != PYDOC and not Path(args.data).is_file():
        what = "is a directory, not a file" if Path(args.data).is_dir() else "no such file"
        raise FileNotFoundError(f"{args.data}: {what}. Fix: use --data pydoc (built-in text) or the path of a .txt "
                                "or .jsonl file")
    try:
        path = resolve(args.model, quiet=args.json)
    except (FileNotFoundError, ValueError):
        return  # a source that cannot be found or read: load() raises the same error at once, before any work
    spec = load_spec_state(path, quiet=True)[0]
    if "ppl" in args.task and args.seq_len > spec.max_position:
        raise ValueError(f"--seq-len {args.seq_len} is longer than {args.model}'s context of {spec.max_position} "
                         f"positions. Fix: pass --seq-len {spec.max_position} or less")
    tok = load_tokenizer(path)
    check_eval_data(tok, args.data, args.task, args.seq_len, args.mc_items, args.split,
                    max_tokens=args.max_tokens or None)
    top = int(token_stream(tok, args.data, args.split).max()) if "ppl" in args.task else -1
    if top >= spec.vocab_size:  # tokenizer files of another model: an IndexError after the load else
        raise ValueError(f"{args.model}: its tokenizer gives token id {top}, past the model's vocabulary of "
                         f"{spec.vocab_size}. Fix: copy the tokenizer files of the model it came from into it")


def run(args: argparse.Namespace) -> int:
    from layerfold.evaluation.streamed import evaluation_model, weight_bytes, weights_place

    check_before_load(args)
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
