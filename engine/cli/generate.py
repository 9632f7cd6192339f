"""`layerfold generate MODEL "prompt"`: a completion through the chat template, streamed as it comes."""

from __future__ import annotations

import argparse
import sys
import time

from layerfold.cli.util import add_common, emit, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt",
                       description="Generate text with the lean runtime (static KV cache). The prompt goes through "
                       "the tokenizer's chat template as a user turn unless --no-chat. Tokens are printed as they "
                       "come unless --json. Greedy by default; --temperature > 0 samples.")
    add_common(p)
    p.add_argument("prompt", nargs="+", help="the prompt(s); several prompts are generated as one batch")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not reproducible)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a string that ends the completion (repeatable); EOS always does")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as plain text, not as a chat user turn")
    p.add_argument("--stream", action="store_true",
                   help="stream tokens as they come (the default without --json; with several prompts, each "
                   "prompt's text is printed when it is done)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfold.core.loading import load
    from layerfold.inference.generate import check_sampling, generate

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1. Fix: ask for at least one token")
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before loading the model
    model, tok = load(args.model, device=args.device, dtype=torch_dtype(args.dtype),
                      allow_nonfinite=args.allow_nonfinite)
    live = not args.json and len(args.prompt) == 1
    t0 = time.perf_counter()

    def show(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    res = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, stop=args.stop, chat=not args.no_chat,
                   stream=show if live else None)
    dt = time.perf_counter() - t0
    out = [{"prompt": r.prompt, "text": r.text, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": len(r.token_ids), "finish_reason": r.finish_reason} for r in res]
    n = sum(len(r.token_ids) for r in res)
    if args.json:
        emit(args, {"model": args.model, "results": out, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 2)})
    elif live:
        print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s, finish: {res[0].finish_reason}]", file=sys.stderr)
    else:
        for r in res:
            print(f"### {r.prompt}\n{r.text}\n")
    return 0
