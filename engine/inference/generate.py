"""Text generation: chat template, batched prefill + decode on the Runtime, sampling, stop strings, streaming.

``generate(model, tokenizer, prompts)`` is the Python API (and what ``layerfold generate`` calls);
``stream_generate`` yields text deltas as tokens come. Both run on ``layerfold.inference.runtime.Runtime``: one
prefill of all prompts (right-padded, one cache row each), then one batched decode step per token.
Greedy decoding is the argmax of the logits; sampling applies temperature, then top-p (nucleus) on
the sorted probabilities, and draws with a per-prompt ``torch.Generator`` seeded with ``seed`` (so a
prompt's sample does not depend on the other prompts in the batch).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from layerfold.core.model import Model
from layerfold.inference.runtime import Runtime

__all__ = ["GenerationResult", "StreamEvent", "TextStream", "encode_prompt", "eos_ids", "generate",
           "get_runtime", "sample_next", "stream_generate"]


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
def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
    """Token ids of a prompt: through the tokenizer's chat template (a user turn, or a list of
    {"role", "content"} messages) with the assistant's generation prompt appended, or as plain text."""
    if chat or not isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template. Fix: pass chat=False (--no-chat) to use the "
                             "prompt as plain text")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def eos_ids(model_or_spec: Any, tokenizer: Any) -> set[int]:
    spec = getattr(model_or_spec, "spec", model_or_spec)
    out = set(spec.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out


class TextStream:
    """Incremental detokenisation of one sequence with stop strings.

    Text is released only when it can no longer change: not while the decoded tail is an incomplete
    UTF-8 character (U+FFFD) and not while it could still be the beginning of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (truncated at a stop string once found)
        self.sent = 0  # characters released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly releasable text (``stopped`` turns True at a stop string)."""
        self.ids.append(int(token))
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = full.find(s, max(0, self.sent - len(s)))
            if at != -1:
                full, self.stopped = full[:at], True
        self.text = full
        end = len(full)
        if not self.stopped:
            if full.endswith("\ufffd"):
                return ""
            hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            end -= hold
        if end <= self.sent:
            return ""
        out, self.sent = full[self.sent:end], end
        return out

    def flush(self) -> str:
        """The text still held back when generation ends for another reason (EOS, length)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ---- sampling --------------------------------------------------------------------------------------
def sample_next(logits: Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token per row of ``logits`` (n, V): argmax where temperature is 0, else a draw from the
    temperature-scaled distribution restricted to the smallest top-p nucleus."""
    out = logits.argmax(-1).tolist()
    for i, (t, p, g) in enumerate(zip(temperature, top_p, generators, strict=True)):
        if t <= 0:
            continue
        probs = torch.softmax(logits[i].float() / t, dim=-1)
        if p < 1.0:
            sp, idx = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < p  # tokens whose preceding mass is below p (the first always)
            sp = sp * keep
            out[i] = int(idx[torch.multinomial(sp / sp.sum(), 1, generator=g)])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=g))
    return out


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
    stream: TextStream
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = "length"


def stream_generate(model: Model, tokenizer: Any, prompts: list[str] | str, *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: Sequence[str] | None = None, chat: bool = True,
                    runtime: Runtime | None = None) -> Iterator[StreamEvent]:
    """Generate for every prompt at once, yielding a StreamEvent whenever text becomes final and one
    final event (``finished=True``, with the GenerationResult) per prompt."""
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    if not plist:
        return
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1. Fix: ask for at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1. "
                         "Fix: use temperature 0 for greedy decoding and top_p 1 for no nucleus cut")
    ids = [encode_prompt(tokenizer, p, chat) for p in plist]
    longest = max(len(x) for x in ids)
    rt = runtime or get_runtime(model, len(plist), min(longest + max_new_tokens, model.spec.max_position))
    if len(plist) > rt.max_batch:
        raise ValueError(f"{len(plist)} prompts for a Runtime of {rt.max_batch} rows. Fix: build it with "
                         f"max_batch={len(plist)} or pass fewer prompts")
    rt.reset()
    eos = eos_ids(model, tokenizer)
    seqs = [_Seq(i, p, len(x), TextStream(tokenizer, stop or ()),
                 torch.Generator().manual_seed(seed) if seed is not None else None)
            for i, (p, x) in enumerate(zip(plist, ids, strict=True))]
    temps, tops = [temperature] * len(seqs), [top_p] * len(seqs)
    logits = rt.prefill(ids)
    while True:
        nxt = sample_next(logits, temps, tops, [s.gen for s in seqs])
        for s, t in zip(seqs, nxt, strict=True):
            if s.done:
                continue
            if t in eos:
                s.done, s.reason = True, "stop"
            else:
                s.tokens.append(t)
                delta = s.stream.push(t)
                if s.stream.stopped:
                    s.done, s.reason = True, "stop"
                elif len(s.tokens) >= max_new_tokens or rt.lengths[s.index] >= rt.max_len:
                    s.done = True
                if delta:
                    yield StreamEvent(s.index, delta)
            if s.done:
                tail = "" if s.stream.stopped else s.stream.flush()
                if tail:
                    yield StreamEvent(s.index, tail)
                res = GenerationResult(s.prompt, s.stream.text, list(s.tokens), s.n_prompt, s.reason)
                yield StreamEvent(s.index, "", finished=True, result=res)
        if all(s.done for s in seqs):
            return
        logits = rt.decode(nxt, active=[not s.done for s in seqs])


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
