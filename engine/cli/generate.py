"""`layerfold generate MODEL "prompt"`: a completion through the chat template, streamed as it comes."""

from __future__ import annotations

import argparse
import sys
import time

from layerfold.cli.util import add_common, add_weights, emit, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt",
                       description="Generate text with the lean runtime (static KV cache). The prompt goes through "
                       "the tokenizer's chat template as a user turn unless --no-chat. Tokens are printed as they "
                       "come unless --json. Greedy by default; --temperature > 0 samples (with --top-p, --top-k, "
                       "--min-p); the penalties apply to greedy decoding too.")
    add_common(p)
    add_weights(p)
    p.add_argument("prompt", nargs="+", help="the prompt(s); several prompts are generated as one batch")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to generate (default 128, fewer when the model's context is shorter)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability (default 1)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens only (default 0: all)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the most likely one's probability (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the positive logits (multiply the negative) of every token already in the prompt or "
                   "the completion by this, as HF and vLLM do; 1.1-1.3 curbs the loops a pruned model can fall into "
                   "(default 1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtract this from the logit of every token the completion holds (-2..2)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtract this once per time the completion holds a token (-2..2)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not reproducible)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a string that ends the completion (repeatable); EOS always does")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as plain text, not as a chat user turn")
    p.add_argument("--stream", action="store_true",
                   help="stream tokens as they come (the default without --json; with several prompts, each "
                   "prompt's text is printed when it is done)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfold.core.loading import load, load_spec_state
    from layerfold.inference.controls import SamplingParams
    from layerfold.inference.generate import check_length, check_sampling, generate

    asked = args.max_new_tokens
    if asked is not None and asked < 1:
        raise ValueError(f"--max-new-tokens {asked} must be >= 1. Fix: ask for at least one token")
    controls = {"top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
                "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty}
    check_sampling(asked or 1, args.temperature, args.top_p, args.seed, args.stop,  # before loading the model
                   SamplingParams.make(temperature=args.temperature, top_p=args.top_p, **controls))
    context = load_spec_state(args.model)[0].max_position  # the config and the weights' header only
    args.max_new_tokens = min(128, context - 1) if asked is None else asked
    check_length(context, args.max_new_tokens)
    from layerfold.evaluation.streamed import weight_bytes, weights_place

    dtype = torch_dtype(args.dtype)
    place, why = weights_place(args.weights, args.device, lambda: weight_bytes(args.model, dtype))
    if place == "host":  # every step streams the layers to --device: prompts together cost one pass a step
        print(f"weights in host memory ({why}); each step streams them to {args.device}", file=sys.stderr)
    model, tok = load(args.model, device="cpu" if place == "host" else args.device, dtype=dtype,
                      allow_nonfinite=args.allow_nonfinite)
    live = not args.json and len(args.prompt) == 1
    t0 = time.perf_counter()

    def show(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    res = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, stop=args.stop, chat=not args.no_chat,
                   stream=show if live else None, stream_to=args.device if place == "host" else None, **controls)
    dt = time.perf_counter() - t0
    out = [{"prompt": r.prompt, "text": r.text, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason, "context_full": r.context_full}
           for r in res]
    n = sum(r.completion_tokens for r in res)
    if args.json:
        emit(args, {"model": args.model, "results": out, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 2),
                    "weights": {"place": place, "why": why}})
    elif live:
        print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s, finish: {res[0].finish_reason}]", file=sys.stderr)
    else:
        for r in res:
            print(f"### {r.prompt}\n{r.text}\n")
    for i, r in enumerate(res):
        if r.context_full:  # stopped early, not at --max-new-tokens: say why
            print(f"note: prompt {i} stopped after {r.completion_tokens} of the {args.max_new_tokens} new tokens asked "
                  f"for: its {r.prompt_tokens} prompt tokens and the completion filled the model's context of "
                  f"{context} positions (shorten the prompt for a longer completion)", file=sys.stderr)
    return 0
