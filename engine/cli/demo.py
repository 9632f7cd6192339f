"""`layerfold demo`: the main job on the embedded default model, end to end, in one command.

convert (cached) -> inspect -> generate an answer -> evaluate -> calibrate -> prune -> evaluate the
pruned model -> benchmark dense vs pruned. Every stage is a library call a user can run on its own;
the demo prints the equivalent CLI command before each stage.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from layerfold.cli.util import count_arg, emit
from layerfold.core.console import table
from layerfold.core.loading import DEFAULT_MODEL, cache_dir

STAGES = ("generate", "eval", "prune", "bench")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default model (SmolLM2-135M)",
                       description="Convert the embedded SmolLM2-135M-Instruct, show its shape, answer a prompt, "
                       "evaluate it, calibrate, prune it by depth surgery, evaluate the pruned model and "
                       "benchmark dense vs pruned speed. Prints the equivalent command for each stage.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to run on (default: the embedded smollm2-135m)")
    p.add_argument("--method", default="streamline", help="pruning method for the demo (default: streamline)")
    p.add_argument("--target", default="8", help="pruning target: layers removed, fraction, or params:F (default 8)")
    p.add_argument("--out", default=None, help="where to write the pruned checkpoint "
                   "(default: <cache>/demo-<method>-<target>, replaced on each run)")
    p.add_argument("--prompt", default="What is a Python list comprehension? Answer in two sentences.",
                   help="prompt for the generation stage")
    p.add_argument("--max-new-tokens", type=count_arg(1), default=64, help="tokens to generate (default 64)")
    p.add_argument("--quick", action="store_true", help="smaller evaluation and calibration (a smoke run)")
    p.add_argument("--skip", default="", help="comma list of stages to skip: " + ",".join(STAGES))
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end instead of tables")
    p.set_defaults(func=run)


def check_before_work(args: argparse.Namespace, skip: set[str], out: Path) -> None:
    """--skip, --method, --target and --out checked before stage 1: a typo must not surface at stage 5, after
    the generation and the dense evaluation (minutes), nor --out be found to hold a user's files only then."""
    from layerfold.core.loading import resolve
    from layerfold.core.paths import check_output
    from layerfold.methods import get_method
    from layerfold.methods.base import Target
    from layerfold.pipeline import check_before_load

    unknown = sorted(skip - set(STAGES))
    if unknown:
        raise ValueError(f"--skip {','.join(unknown)}: no such stage. Fix: name stages among {','.join(STAGES)}")
    if "prune" in skip:
        return
    method = get_method(args.method)
    check_output(out, sources=[args.model, resolve(args.model, quiet=args.json)], overwrite=True)
    check_before_load(args.model, method, Target.parse(args.target), None, "pydoc")


def _stage(title: str, cmd: str, quiet: bool) -> float:
    if not quiet:
        print(f"\n== {title}\n   $ {cmd}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from layerfold import load
    from layerfold.cli.inspect import describe
    from layerfold.core.loading import load_spec_state

    quiet = args.json
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    summary: dict[str, Any] = {"model": args.model}
    eval_kw: dict[str, Any] = dict(max_tokens=2048, mc_items=40) if args.quick else {}
    out = Path(args.out) if args.out else cache_dir() / f"demo-{args.method}-{args.target}"
    check_before_work(args, skip, out)

    t = _stage("1. convert (cached after the first run)", f"layerfold convert {args.model} --out DIR", quiet)
    model, tok = load(args.model, quiet=quiet)
    summary["load_seconds"] = round(time.perf_counter() - t, 2)
    if not quiet:
        print(f"   loaded in {summary['load_seconds']} s (cache: {cache_dir()})")

    _stage("2. inspect", f"layerfold inspect {args.model}", quiet)
    spec, state, _ = load_spec_state(args.model, quiet=True)
    d = describe(spec, state)
    summary["dense"] = {"layers": spec.n_layers, "params": d["params"]}
    if not quiet:
        l0 = spec.layers[0]
        print(f"   {spec.arch}: {spec.n_layers} layers x (d {l0.d_in}, {l0.n_heads} heads / {l0.n_kv_heads} KV, "
              f"head dim {l0.head_dim}, FFN {l0.d_ffn}), vocab {spec.vocab_size}, {d['params'] / 1e6:.1f}M params")

    if "generate" not in skip:
        from layerfold.inference.generate import generate

        _stage("3. generate", f'layerfold generate {args.model} "{args.prompt}"', quiet)
        res = generate(model, tok, [args.prompt], max_new_tokens=args.max_new_tokens)[0]
        summary["generation"] = {"prompt": args.prompt, "text": res.text}
        if not quiet:
            print("   " + res.text.strip().replace("\n", "\n   "))

    dense_eval = None
    if "eval" not in skip:
        from layerfold.evaluation.evaluate import evaluate

        _stage("4. evaluate (held-out Python documentation text)",
               f"layerfold eval {args.model} --data pydoc --task ppl,mc", quiet)
        dense_eval = evaluate(model, tok, progress=not quiet, **eval_kw)
        summary["dense"].update(ppl=dense_eval["ppl"]["ppl"], acc=dense_eval["mc"]["acc"])
        if not quiet:
            print(f"   perplexity {dense_eval['ppl']['ppl']:.3f}, continuation accuracy "
                  f"{dense_eval['mc']['acc']:.3f} (acc_norm {dense_eval['mc']['acc_norm']:.3f})")

    if "prune" not in skip:
        from layerfold.evaluation.evaluate import evaluate
        from layerfold.pipeline import prune, where_layers_went

        _stage("5. calibrate + prune", f"layerfold prune {args.model} --method {args.method} "
               f"--target {args.target} --out {out}", quiet)
        kw: dict[str, Any] = dict(samples=16, seq_len=128) if args.quick else {}
        report = prune(args.model, args.method, args.target, out, overwrite=True, progress=not quiet, eval=False,
                       **kw)
        pruned, _ = load(out, quiet=True, tokenizer=False)
        summary["pruned"] = {"out": str(out), "layers": pruned.spec.n_layers, "params": pruned.num_params(),
                             "method": report["method"], "seconds": round(report["times"]["total"], 1)}
        if not quiet:
            for line in where_layers_went(report):
                print("   " + line)
        if dense_eval is not None:
            _stage("6. evaluate the pruned model", f"layerfold eval {out}", quiet)
            pe = evaluate(pruned, tok, progress=not quiet, **eval_kw)
            summary["pruned"].update(ppl=pe["ppl"]["ppl"], acc=pe["mc"]["acc"])
            if not quiet:
                dn = summary["dense"]
                rows = [["dense", dn["layers"], dn["params"] / 1e6, dn["ppl"], dn["acc"]],
                        [report["method"], pruned.spec.n_layers, pruned.num_params() / 1e6,
                         pe["ppl"]["ppl"], pe["mc"]["acc"]]]
                print(table(rows, ["model", "layers", "params (M)", "val ppl", "val acc"]))
        del pruned

    if "bench" not in skip and out.exists():
        from layerfold.evaluation.benchmark import bench_models, format_table

        _stage("7. benchmark dense vs pruned (bf16 decode, batch 1)",
               f"layerfold bench {args.model} {out} --dtype bfloat16 --batch-sizes 1"
               + (" --new-tokens 32" if args.quick else ""), quiet)
        b = bench_models([args.model, str(out)], dtype=torch.bfloat16, batch_sizes=(1,),
                         new_tokens=32 if args.quick else 128, repeats=3, progress=not quiet)
        summary["bench"] = b["rows"]
        if not quiet:
            print(format_table(b))

    if quiet:
        emit(args, summary)
    return 0
