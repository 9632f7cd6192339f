"""Turning logits into accepted tokens: sampling, stop strings, EOS and length limits.

One copy of the rules, used by ``generate`` (one batch of prompts) and the server's scheduler (continuous
batching): :func:`sample_each` draws the next token of each row (a row whose logits are not finite fails
alone); a :class:`Completion` accepts it, ends the sequence at an EOS token, a stop string or a limit, and
releases text only once it is final; :func:`token_logprobs` gives a token's log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["TEMPERATURE_FLOOR", "Completion", "SamplingError", "TextStream", "TokenLogprob", "eos_ids", "sample_each",
           "sample_next", "sample_row", "token_logprobs"]


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
# Temperatures below this sample greedily (vLLM's rule): the scaled logits of a smaller one overflow,
# and its distribution is the argmax anyway.
TEMPERATURE_FLOOR = 1e-5


class SamplingError(ValueError):
    """One row could not be sampled (its logits hold NaN or Inf); the other rows are unaffected."""


def sample_row(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
               greedy: int | None = None) -> int:
    """The next token of one row of logits (V,): the argmax (``greedy`` when already known) at a temperature
    below TEMPERATURE_FLOOR, else a draw from the temperature-scaled distribution restricted to the
    smallest top-p nucleus. Raises SamplingError for non-finite logits."""
    if not bool(torch.isfinite(logits).all()):
        raise SamplingError("the model produced NaN or Inf logits for this sequence (its weights or inputs "
                            "overflowed). Fix: check the model with `layerfold eval`; re-create it if it is damaged")
    if not temperature >= TEMPERATURE_FLOOR:
        return int(logits.argmax()) if greedy is None else greedy
    x = logits.float()
    probs = torch.softmax((x - x.max()) / temperature, dim=-1)  # max 0: no overflow at small temperatures
    if top_p < 1.0:
        sp, idx = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # tokens whose preceding mass is below p
        keep[0] = True  # the first always, also for a p that rounds to 0 in float32
        sp = sp * keep
        return int(idx[torch.multinomial(sp / sp.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_each(logits: Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> list[int | SamplingError]:
    """Next token per row of ``logits`` (n, V), or the SamplingError of a row that failed: one bad row
    fails only itself (the server's scheduler answers that request with an error and keeps the others)."""
    greedy = logits.argmax(-1).tolist()
    finite = torch.isfinite(logits).all(-1).tolist()
    out: list[int | SamplingError] = []
    for i, (t, p, g) in enumerate(zip(temperature, top_p, generators, strict=True)):
        try:
            out.append(greedy[i] if finite[i] and not t >= TEMPERATURE_FLOOR else
                       sample_row(logits[i], t, p, g, greedy[i]))
        except SamplingError as e:
            out.append(e)
    return out


def sample_next(logits: Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token per row of ``logits`` (n, V) (rules: :func:`sample_row`); raises the first row's error."""
    out = sample_each(logits, temperature, top_p, generators)
    for x in out:
        if isinstance(x, SamplingError):
            raise x
    return out  # type: ignore[return-value]


def token_logprobs(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of ``token`` under the model's distribution (logits (V,), before temperature
    and top-p) and the ``top`` most likely tokens with theirs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top > 0:
        v, i = lp.topk(top)
        best = list(zip(i.tolist(), v.tolist(), strict=True))
    return TokenLogprob(int(token), float(lp[token]), best)


@dataclass
class TokenLogprob:
    """One token with its log-probability (None for a prompt's first token, which nothing predicts) and
    the most likely alternatives at its position as (token id, log-probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One sequence being generated: accepts sampled tokens until EOS, a stop string, ``max_tokens`` or a
    full cache row ends it (``finish_reason`` "stop" or "length"). Tokens and text exclude the EOS token
    and the stop string."""

    stream: TextStream
    eos: set[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, cache_full: bool = False) -> str:
        """Take a sampled token; return the text it makes final (with the held-back tail when it ends the
        sequence). ``cache_full``: the row has no slot left for another token."""
        if self.done:
            raise RuntimeError("accept() after the completion finished")
        if token in self.eos:
            self.finish_reason = "stop"
            return self.stream.flush()
        self.tokens.append(int(token))
        text = self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens or cache_full:
            self.finish_reason = "length"
            text += self.stream.flush()
        return text

    @property
    def text(self) -> str:
        return self.stream.text
