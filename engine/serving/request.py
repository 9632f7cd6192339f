"""One request to the scheduler: what it asks for (:class:`Request`), what it hears back (:class:`Event`), and
:func:`check_request`, which finds before it is queued everything about it that could fail once it runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from layerfold.inference.controls import SamplingParamError, SamplingParams
from layerfold.inference.sampling import Completion, TokenLogprob

__all__ = ["MAX_LOGPROBS", "MAX_STOP", "MAX_STOP_CHARS", "SEED_RANGE", "TOP_P_FLOOR", "Event", "Request",
           "RequestError", "check_request"]


class RequestError(ValueError):
    """A request that cannot be served; ``param`` names the field at fault (the caller answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP, MAX_STOP_CHARS = 16, 256  # stop strings a request may carry, characters each (each is searched per token)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
# top_p below this (down to denormals that float32 rounds to 0) is raised to it: it keeps the same single
# token (the most likely has probability >= 1/vocab), where a p that rounds to 0 would keep none.
TOP_P_FLOOR = 1e-30


@dataclass
class Event:
    kind: str  # "prompt" (prompt logprobs) | "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on "done"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # "prompt": every prompt token; "delta"/"done": tokens since the last
    ttft_s: float | None = None  # on "done": submit -> first token (None when nothing was generated)
    latency_s: float = 0.0  # on "done": submit -> done


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int  # 0: score the prompt only (needs prompt_logprobs)
    emit: Callable[[Event], None]  # called from the scheduler thread; must not block
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # the other sampling controls (meanings: layerfold.inference.controls)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the completion as EOS does
    ignore_eos: bool = False  # the model's EOS tokens do not end it (benchmarks ask for exact lengths)
    logprobs: int | None = None  # None: no logprobs; k >= 0: each generated token's, with k alternatives
    prompt_logprobs: bool = False  # also every prompt token's (first event "prompt"), with ``logprobs`` alternatives
    id: int = 0
    cancelled: bool = False  # set by any thread; the scheduler frees the slot before its next step
    # filled by the scheduler
    completion: Completion | None = None
    sampling: SamplingParams | None = None  # params(), when the request starts
    gen: torch.Generator | None = None
    submitted: float = 0.0
    first_token: float | None = None
    pending_lp: list[TokenLogprob] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def params(self) -> SamplingParams:
        return SamplingParams.make(temperature=self.temperature, top_p=max(self.top_p, TOP_P_FLOOR), top_k=self.top_k,
                                   min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                   presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                   logit_bias=self.logit_bias, min_tokens=self.min_tokens)


def check_request(r: Request, vocab_size: int, max_len: int) -> None:
    """Raise RequestError (naming the field) for anything in ``r`` that would fail once it runs."""
    p = r.prompt_ids
    if not p:
        raise RequestError("the prompt is empty. Fix: send at least one token of prompt", "prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in p):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size}). Fix: tokenize with this model's "
                           "tokenizer", "prompt")
    if not isinstance(r.max_tokens, int) or isinstance(r.max_tokens, bool) or r.max_tokens < 0:
        raise RequestError(f"max_tokens={r.max_tokens!r} must be a whole number >= 0. Fix: e.g. max_tokens=16",
                           "max_tokens")
    if r.max_tokens == 0 and not r.prompt_logprobs:
        raise RequestError("max_tokens=0 generates nothing. Fix: ask for at least 1 token, or score the prompt with "
                           "echo=true and logprobs", "max_tokens")
    if r.max_tokens > 0 and len(p) + r.max_tokens > max_len:
        raise RequestError(f"the prompt ({len(p)} tokens) plus max_tokens={r.max_tokens} exceeds the context of "
                           f"{max_len} tokens. Fix: ask for at most {max(max_len - len(p), 0)} tokens or shorten the "
                           "prompt", "max_tokens")
    if len(p) > max_len:
        raise RequestError(f"the prompt has {len(p)} tokens; the context holds {max_len}. Fix: shorten the prompt",
                           "prompt")
    if r.seed is not None and (not isinstance(r.seed, int) or not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]):
        raise RequestError(f"seed={r.seed} is outside [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (a 64-bit integer). Fix: pass "
                           "a smaller seed", "seed")
    if not (isinstance(r.temperature, (int, float)) and math.isfinite(r.temperature) and r.temperature >= 0):
        raise RequestError(f"temperature={r.temperature} must be a finite number >= 0. Fix: e.g. 0 (greedy) or 0.7",
                           "temperature")
    if not (isinstance(r.top_p, (int, float)) and math.isfinite(r.top_p) and 0 < r.top_p <= 1):
        raise RequestError(f"top_p={r.top_p} must lie in (0, 1]. Fix: e.g. 0.9, or 1 for no nucleus", "top_p")
    if len(r.stop) > MAX_STOP or any(not isinstance(x, str) or len(x) > MAX_STOP_CHARS for x in r.stop):
        raise RequestError(f"stop holds {len(r.stop)} strings; at most {MAX_STOP} strings of at most "
                           f"{MAX_STOP_CHARS} characters are accepted. Fix: send fewer, shorter stop strings", "stop")
    if any(x == "" for x in r.stop):
        raise RequestError("stop holds an empty string, which would match before any text (vLLM refuses it too). Fix: "
                           "leave it out", "stop")
    if r.logprobs is not None and not (isinstance(r.logprobs, int) and 0 <= r.logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs={r.logprobs} must be a whole number in [0, {MAX_LOGPROBS}]. Fix: ask for at "
                           f"most {MAX_LOGPROBS} alternatives", "logprobs")
    if not isinstance(r.logit_bias, dict):
        raise RequestError("logit_bias must map token ids to biases. Fix: e.g. {\"50256\": -100}", "logit_bias")
    try:
        r.params().check(vocab_size)
    except (SamplingParamError, TypeError) as e:
        raise RequestError(str(e), getattr(e, "param", None)) from None
    if r.max_tokens > 0 and r.min_tokens > r.max_tokens:
        raise RequestError(f"min_tokens={r.min_tokens} is more than the {r.max_tokens} tokens this request can "
                           "generate (its max_tokens, or the room its prompt leaves in the context). Fix: ask for at "
                           f"most {r.max_tokens}", "min_tokens")
    if not isinstance(r.stop_token_ids, list):
        raise RequestError("stop_token_ids must be a list of token ids. Fix: e.g. [2]", "stop_token_ids")
    if len(r.stop_token_ids) > MAX_STOP or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
                                               for t in r.stop_token_ids):
        raise RequestError(f"stop_token_ids must hold at most {MAX_STOP} token ids in [0, {vocab_size}). Fix: use this "
                           "model's tokenizer's ids", "stop_token_ids")
    if not isinstance(r.ignore_eos, bool):
        raise RequestError("ignore_eos must be true or false. Fix: e.g. \"ignore_eos\": true", "ignore_eos")
