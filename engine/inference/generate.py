"""Text generation: chat template, batched prefill + decode on the Runtime, sampling, stop strings, streaming.

``generate(model, tokenizer, prompts)`` is the Python API (and what ``layerfold generate`` calls);
``stream_generate`` yields text deltas as tokens come. Both run on ``layerfold.inference.runtime.Runtime``: one
prefill of all prompts (right-padded, one cache row each), then one batched decode step per token.
Greedy decoding is the argmax of the logits; sampling applies temperature, then top-p (nucleus) on
the sorted probabilities, and draws with a per-prompt ``torch.Generator`` seeded with ``seed`` (so a
prompt's sample does not depend on the other prompts in the batch).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.inference.runtime import Runtime
from layerfold.inference.sampling import Completion, TextStream, eos_ids, sample_next

__all__ = ["GenerationResult", "StreamEvent", "check_sampling", "encode_prompt", "generate", "get_runtime",
           "stream_generate"]


@dataclass
class GenerationResult:
    prompt: str
    text: str  # generated text, stop string and EOS excluded
    token_ids: list[int]  # generated tokens (EOS excluded)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens or the cache)


@dataclass
class StreamEvent:
    index: int  # which prompt
    delta: str  # new text since the previous event for this prompt ("" on the final event)
    finished: bool = False
    result: GenerationResult | None = None  # set on the final event


# ---- tokens in, text out ---------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]] | list[int], chat: bool = True) -> list[int]:
    """Token ids of a prompt: through the tokenizer's chat template (a user turn, or a list of
    {"role", "content"} messages) with the assistant's generation prompt appended, or as plain text; a list
    of token ids is taken as it is (callers that tokenise themselves, e.g. the lm-eval adapter)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if chat or not isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template. Fix: pass chat=False (--no-chat) to use the "
                             "prompt as plain text")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


# ---- runtime reuse ---------------------------------------------------------------------------------
_RUNTIMES: weakref.WeakKeyDictionary[Model, tuple[tuple, Runtime]] = weakref.WeakKeyDictionary()


def _fingerprint(model: Model) -> tuple:
    # Parameter identities and in-place version counters: a changed weight (healing, load_state_dict)
    # invalidates the fused copies the Runtime holds.
    return tuple((id(p), p._version) for p in model.parameters())


def get_runtime(model: Model, max_batch: int, max_len: int) -> Runtime:
    """A Runtime for ``model`` with at least this many rows and slots, reused across calls while the
    model's weights are unchanged."""
    fp = _fingerprint(model)
    hit = _RUNTIMES.get(model)
    if hit is not None:
        key, rt = hit
        if key == fp and rt.max_batch >= max_batch and rt.max_len >= max_len:
            rt.reset()
            return rt
    rt = Runtime(model, max_batch=max_batch, max_len=min(max(max_len, 256), model.spec.max_position))
    _RUNTIMES[model] = (fp, rt)
    return rt


# ---- generation ------------------------------------------------------------------------------------
@dataclass
class _Seq:
    index: int
    prompt: str
    n_prompt: int
    completion: Completion
    gen: torch.Generator | None


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """Generation settings checked before any work: a ValueError naming the setting and the fix."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1. Fix: ask for at least one token")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}: need a finite temperature >= 0 and 0 < top_p "
                         "<= 1. Fix: use temperature 0 for greedy decoding and top_p 1 for no nucleus cut")
    if seed is not None and not -(2 ** 63) <= seed < 2 ** 64:
        raise ValueError(f"seed={seed} is out of range. Fix: use a seed in [-2**63, 2**64 - 1]")


def stream_generate(model: Model, tokenizer: Any, prompts: list[str] | str, *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: Sequence[str] | None = None, chat: bool = True,
                    runtime: Runtime | None = None) -> Iterator[StreamEvent]:
    """Generate for every prompt at once, yielding a StreamEvent whenever text becomes final and one
    final event (``finished=True``, with the GenerationResult) per prompt."""
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    if not plist:
        return
    check_sampling(max_new_tokens, temperature, top_p, seed)
    ids = [encode_prompt(tokenizer, p, chat) for p in plist]
    empty = [i for i, x in enumerate(ids) if not len(x)]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: it has no tokens to continue. Fix: give a non-empty prompt (or "
                         "use the chat template, which adds the turn's own tokens)")
    longest = max(len(x) for x in ids)
    rt = runtime or get_runtime(model, len(plist), min(longest + max_new_tokens, model.spec.max_position))
    if len(plist) > rt.max_batch:
        raise ValueError(f"{len(plist)} prompts for a Runtime of {rt.max_batch} rows. Fix: build it with "
                         f"max_batch={len(plist)} or pass fewer prompts")
    rt.reset()
    eos = eos_ids(model, tokenizer)
    seqs = [_Seq(i, p, len(x), Completion(TextStream(tokenizer, stop or ()), eos, max_new_tokens),
                 torch.Generator().manual_seed(seed) if seed is not None else None)
            for i, (p, x) in enumerate(zip(plist, ids, strict=True))]
    temps, tops = [temperature] * len(seqs), [top_p] * len(seqs)
    logits = rt.prefill(ids)
    while True:
        nxt = sample_next(logits, temps, tops, [s.gen for s in seqs])
        for s, t in zip(seqs, nxt, strict=True):
            c = s.completion
            if c.done:
                continue
            delta = c.accept(t, cache_full=rt.lengths[s.index] >= rt.max_len)
            if delta:
                yield StreamEvent(s.index, delta)
            if c.done:
                res = GenerationResult(s.prompt, c.text, list(c.tokens), s.n_prompt, c.finish_reason or "length")
                yield StreamEvent(s.index, "", finished=True, result=res)
        if all(s.completion.done for s in seqs):
            return
        logits = rt.decode(nxt, active=[not s.completion.done for s in seqs])


def generate(model: Model, tokenizer: Any, prompts: list[str] | str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | None = None, chat: bool = True,
             stream: Callable[[int, str], None] | None = None,
             runtime: Runtime | None = None) -> list[GenerationResult]:
    """Generate a completion for each prompt (one batch); returns results in prompt order.

    stream: called as ``stream(index, text_delta)`` whenever new text of prompt ``index`` is final.
    chat: wrap each prompt as a user turn in the tokenizer's chat template (with the generation prompt).
    stop: strings that end a completion (not included in its text); EOS tokens of the model and the
    tokenizer always do. runtime: reuse a Runtime (default: one cached per model).
    """
    n = 1 if isinstance(prompts, str) else len(prompts)
    results: list[GenerationResult | None] = [None] * n
    for ev in stream_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop=stop, chat=chat, runtime=runtime):
        if ev.delta and stream is not None:
            stream(ev.index, ev.delta)
        if ev.finished:
            results[ev.index] = ev.result
    return [r for r in results if r is not None]
