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
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.inference.controls import SamplingParams
from layerfold.inference.runtime import Runtime
from layerfold.inference.sampling import Completion, TextStream, eos_ids, sample_next, shaper_for

__all__ = ["GenerationResult", "StreamEvent", "check_length", "check_sampling", "check_text", "encode_prompt",
           "generate", "get_runtime", "sampling_params", "stop_list", "stream_generate"]


@dataclass
class GenerationResult:
    prompt: str
    text: str  # generated text, stop string and EOS excluded
    token_ids: list[int]  # generated tokens (EOS excluded)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens or the cache)
    context_full: bool = False  # the model's context (the cache row) ended it before max_new_tokens
    completion_tokens: int = 0  # tokens sampled: token_ids plus the EOS that ended it (vLLM's and OpenAI's usage)


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
@dataclass
class _Cached:
    key: tuple
    rt: Runtime
    busy: bool = False  # lent to a generation that has not ended


_RUNTIMES: weakref.WeakKeyDictionary[Model, _Cached] = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def _fingerprint(model: Model) -> tuple:
    # Parameter identities and in-place version counters: a changed weight (healing, load_state_dict)
    # invalidates the fused copies the Runtime holds.
    return tuple((id(p), p._version) for p in model.parameters())


def _fits(c: _Cached | None, key: tuple, max_batch: int, max_len: int) -> bool:
    return c is not None and c.key == key and c.rt.max_batch >= max_batch and c.rt.max_len >= max_len


def _new_runtime(model: Model, max_batch: int, max_len: int) -> Runtime:
    return Runtime(model, max_batch=max_batch, max_len=min(max(max_len, 256), model.spec.max_position))


def get_runtime(model: Model, max_batch: int, max_len: int) -> Runtime:
    """A Runtime for ``model`` with at least this many rows and slots, reused across calls while the
    model's weights are unchanged."""
    key = _fingerprint(model)
    with _RUNTIMES_LOCK:
        hit = _RUNTIMES.get(model)
        if _fits(hit, key, max_batch, max_len):
            hit.rt.reset()
            return hit.rt
        rt = _new_runtime(model, max_batch, max_len)
        _RUNTIMES[model] = _Cached(key, rt)
        return rt


def _borrow_runtime(model: Model, max_batch: int, max_len: int) -> tuple[Runtime, Callable[[], None]]:
    """The cached Runtime, lent to one generation at a time, and the call that gives it back. While it is
    lent (another thread's generate, or a stream_generate not yet finished) a call gets a Runtime of its own,
    not cached: two generations sharing one cache would overwrite each other's rows."""
    key = _fingerprint(model)
    with _RUNTIMES_LOCK:
        hit = _RUNTIMES.get(model)
        if hit is None or not hit.busy:
            if not _fits(hit, key, max_batch, max_len):
                hit = _Cached(key, _new_runtime(model, max_batch, max_len))
                _RUNTIMES[model] = hit
            hit.busy = True

            def give_back() -> None:
                with _RUNTIMES_LOCK:
                    hit.busy = False
            return hit.rt, give_back
    return _new_runtime(model, max_batch, max_len), lambda: None


# ---- generation ------------------------------------------------------------------------------------
@dataclass
class _Seq:
    index: int
    prompt: str
    n_prompt: int
    completion: Completion
    gen: torch.Generator | None


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                   stop: Sequence[str] | str | None = None, params: SamplingParams | None = None,
                   vocab_size: int | None = None) -> None:
    """Generation settings checked before any work: a ValueError naming the setting and the fix. ``params``:
    the other sampling controls (top-k, min-p, penalties, logit bias, min_tokens)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1. Fix: ask for at least one "
                         "token, e.g. max_new_tokens=64")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}: need a finite temperature >= 0 and 0 < top_p "
                         "<= 1. Fix: use temperature 0 for greedy decoding and top_p 1 for no nucleus cut")
    if params is not None:
        params.check(vocab_size)
        if params.min_tokens > max_new_tokens:
            raise ValueError(f"min_tokens={params.min_tokens} is more than max_new_tokens={max_new_tokens}. Fix: "
                             "ask for at most as many tokens as can be generated")
    if seed is not None and not -(2 ** 63) <= seed < 2 ** 64:
        raise ValueError(f"seed={seed} is out of range. Fix: use a seed in [-2**63, 2**64 - 1]")
    for i, s in enumerate(stop_list(stop)):
        if not isinstance(s, str):
            raise ValueError(f"stop string {i} is {s!r}, not text. Fix: pass the stop strings as a list of strings")
        if not s:
            raise ValueError(f"stop string {i} is empty (''): it matches everywhere, so it cannot say "
                             "where a completion ends. Fix: give the text that should end it (e.g. --stop '\\n\\n'), "
                             "or leave it out")
        check_text(s, f"stop string {i}")


def check_length(context: int, max_new_tokens: int) -> None:
    """Refuse ``max_new_tokens`` that no prompt leaves room for in a context of ``context`` positions (prompt and
    completion share it; a prompt takes at least one)."""
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} cannot fit: the model's context holds {context} positions "
                         f"for the prompt and the completion together. Fix: ask for fewer new tokens (--max-new-tokens "
                         f"{context - 1} at most; the prompt's tokens count too)")


def check_text(text: str, what: str) -> None:
    """Refuse text that is not Unicode (an unpaired surrogate: bytes that were not UTF-8, escaped by Python)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not UTF-8 text ({text[e.start]!a} at character {e.start}: bytes that are not "
                         "UTF-8). Fix: pass UTF-8 text (convert it, e.g. iconv -t UTF-8)") from None


def stop_list(stop: Sequence[str] | str | None) -> list[str]:
    """Stop strings as a list: one string is one stop string (not one per character)."""
    return [stop] if isinstance(stop, str) else list(stop or ())


def stream_generate(model: Model, tokenizer: Any, prompts: list[str] | str, *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: Sequence[str] | None = None, chat: bool = True,
                    runtime: Runtime | None = None, stream_to: str | torch.device | None = None,
                    **controls: Any) -> Iterator[StreamEvent]:
    """Generate for every prompt at once, yielding a StreamEvent whenever text becomes final and one
    final event (``finished=True``, with the GenerationResult) per prompt. ``stream_to``: compute on this
    device while the model's weights stay where they are (host memory): a ``StreamedRuntime``, one pass
    of the weights over the bus per step for all prompts (``--weights host``). ``controls``: the other
    sampling settings of :class:`layerfold.inference.controls.SamplingParams` (top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, logit_bias as {token id: bias}, min_tokens).
    Without ``runtime``, the model's cached Runtime is used, or, while another generation (another thread,
    or an unfinished stream) holds it, a Runtime of this call's own: calls at once are safe, not shared."""
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    if not plist:
        return
    if runtime is not None and stream_to is not None:
        raise ValueError("runtime and stream_to were both given; stream_to builds a StreamedRuntime of its own. Fix: "
                         "pass one of them (runtime=StreamedRuntime(model, device, ...) to reuse one)")
    stop = stop_list(stop)
    params = sampling_params(temperature, top_p, controls)
    check_sampling(max_new_tokens, temperature, top_p, seed, stop, params, model.spec.vocab_size)
    context = min(model.spec.max_position, runtime.max_len) if runtime else model.spec.max_position
    check_length(context, max_new_tokens)
    for i, p in enumerate(plist):
        for text in [p] if isinstance(p, str) else [m.get("content") for m in p if isinstance(m, dict)]:
            if isinstance(text, str):
                check_text(text, f"prompt {i}")
    ids = [encode_prompt(tokenizer, p, chat) for p in plist]
    _check_ids(model, tokenizer, ids, context, chat)
    longest = max(len(x) for x in ids)
    if runtime is None and stream_to is not None:
        from layerfold.inference.streamed_decode import StreamedRuntime

        runtime = StreamedRuntime(model, stream_to, max_batch=len(plist),
                                  max_len=min(longest + max_new_tokens, model.spec.max_position))
    if runtime is not None and len(plist) > runtime.max_batch:
        raise ValueError(f"{len(plist)} prompts for a Runtime of {runtime.max_batch} rows. Fix: build it with "
                         f"max_batch={len(plist)} or pass fewer prompts")
    eos = eos_ids(model, tokenizer)
    seqs = [_Seq(i, p, len(x), Completion(TextStream(tokenizer, stop), eos, max_new_tokens,
                                          min_tokens=params.min_tokens, shaper=shaper_for(params, x, eos)),
                 torch.Generator().manual_seed(seed) if seed is not None else None)
            for i, (p, x) in enumerate(zip(plist, ids, strict=True))]
    rt, give_back = (runtime, lambda: None) if runtime is not None else \
        _borrow_runtime(model, len(plist), min(longest + max_new_tokens, model.spec.max_position))
    try:
        rt.reset()
        yield from _steps(rt, ids, seqs, params, max_new_tokens)
    except Exception:  # e.g. NaN logits: the rows' caches may hold NaN/Inf, zeroed for the Runtime's next use
        rt.reset(scrub=True)
        raise
    finally:
        give_back()


def _steps(rt: Any, ids: list[list[int]], seqs: list[_Seq], params: SamplingParams, max_new_tokens: int
           ) -> Iterator[StreamEvent]:
    logits = rt.prefill(ids)
    while True:
        nxt = sample_next(logits, [params] * len(seqs), [s.gen for s in seqs], [s.completion.shaper for s in seqs])
        for s, t in zip(seqs, nxt, strict=True):
            c = s.completion
            if c.done:
                continue
            delta = c.accept(t, cache_full=rt.lengths[s.index] >= rt.max_len)
            if delta:
                yield StreamEvent(s.index, delta)
            if c.done:
                res = GenerationResult(s.prompt, c.text, list(c.tokens), s.n_prompt, c.finish_reason or "length",
                                       c.finish_reason == "length" and len(c.tokens) < max_new_tokens, c.sampled)
                yield StreamEvent(s.index, "", finished=True, result=res)
        if all(s.completion.done for s in seqs):
            return
        logits = rt.decode(nxt, active=[not s.completion.done for s in seqs])


def sampling_params(temperature: float, top_p: float, controls: dict[str, Any]) -> SamplingParams:
    """SamplingParams from generate's keyword arguments; an unknown one is a TypeError naming the known."""
    known = {f.name for f in fields(SamplingParams)} - {"temperature", "top_p"}
    unknown = sorted(set(controls) - known)
    if unknown:
        raise TypeError(f"generate() got unknown keyword argument(s) {', '.join(unknown)}. Fix: use the sampling "
                        f"controls {', '.join(sorted(known))}")
    return SamplingParams.make(temperature=temperature, top_p=top_p, **controls)


def _check_ids(model: Model, tokenizer: Any, ids: list[list[int]], context: int, chat: bool) -> None:
    """Prompts the model can read and continue: not empty, no longer than its context, every token id (and the
    tokenizer's EOS) inside its vocabulary (a tokenizer of another model gives ids its embedding lacks)."""
    vocab = model.spec.vocab_size
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} is empty: it has no tokens to continue. Fix: give a non-empty prompt (or "
                             "use the chat template, which adds the turn's own tokens)")
        if len(x) >= context:
            raise ValueError(f"prompt {i} has {len(x)} tokens{' (with the chat template)' if chat else ''}; the "
                             f"model's context holds {context} positions, which leaves none to generate into. Fix: "
                             f"shorten the prompt to at most {context - 1} tokens")
        bad = next((t for t in x if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary of {vocab} tokens. "
                             "Fix: tokenize with this model's own tokenizer (copy its tokenizer files into the model "
                             "folder)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and not 0 <= eos < vocab:
        raise ValueError(f"the tokenizer's end-of-sequence token {eos} is outside the model's vocabulary of {vocab} "
                         "tokens, so no completion could end at it. Fix: use this model's own tokenizer (copy its "
                         "tokenizer files into the model folder)")


def generate(model: Model, tokenizer: Any, prompts: list[str] | str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | None = None, chat: bool = True,
             stream: Callable[[int, str], None] | None = None,
             runtime: Runtime | None = None, stream_to: str | torch.device | None = None,
             **controls: Any) -> list[GenerationResult]:
    """Generate a completion for each prompt (one batch); returns results in prompt order.

    stream: called as ``stream(index, text_delta)`` whenever new text of prompt ``index`` is final.
    chat: wrap each prompt as a user turn in the tokenizer's chat template (with the generation prompt).
    stop: strings that end a completion (not included in its text); EOS tokens of the model and the
    tokenizer always do. runtime: reuse a Runtime (default: one cached per model). stream_to: a device to
    compute on while the weights stay in host memory (see :func:`stream_generate`). ``controls``: top_k,
    min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({token id: bias}), min_tokens
    (:class:`layerfold.inference.controls.SamplingParams`).
    """
    n = 1 if isinstance(prompts, str) else len(prompts)
    results: list[GenerationResult | None] = [None] * n
    for ev in stream_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop=stop, chat=chat, runtime=runtime, stream_to=stream_to,
                              **controls):
        if ev.delta and stream is not None:
            stream(ev.index, ev.delta)
        if ev.finished:
            results[ev.index] = ev.result
    return [r for r in results if r is not None]
