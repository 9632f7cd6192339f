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

from layerfold.inference.controls import TEMPERATURE_FLOOR, LogitShaper, SamplingParams
from layerfold.inference.sample_batch import NONFINITE, SamplingError, sample_batch

__all__ = ["TEMPERATURE_FLOOR", "Completion", "LogitShaper", "SamplingError", "SamplingParams", "TextStream",
           "TokenLogprob", "eos_ids", "sample_each", "sample_next", "sample_row", "shaper_for", "token_logprobs"]


def eos_ids(model_or_spec: Any, tokenizer: Any) -> set[int]:
    spec = getattr(model_or_spec, "spec", model_or_spec)
    out = set(spec.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out


def cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` cleans up the whole decoded text (transformers' clean_up_tokenization_spaces,
    which transformers 5 skips for BPE models): tried on a text it would change, as the flag alone does not tell.
    (A decoder's own per-token cleanup, as WordPiece's, is no concern: each window decodes it as the whole does.)"""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        ids = tokenizer.encode("a ' a . a", add_special_tokens=False)
        return bool(tokenizer.decode(ids, skip_special_tokens=True) !=
                    tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    except (TypeError, ValueError, AttributeError):  # cannot tell: decode the whole text, which is always right
        return True


class TextStream:
    """Incremental detokenisation of one sequence with stop strings.

    Text is released only when it can no longer change: not while the decoded tail is an incomplete
    UTF-8 character (U+FFFD) and not while it could still be the beginning of a stop string.

    Each token decodes a short window (from the commit point before last: every commit point ends a whole
    character, so the window starts a clean UTF-8 sequence even amid byte-fallback tokens) and appends the
    window's new text, so a token costs the same at position 10 and at 10,000; decoding every id again each
    token made a 4,000-token completion spend 0.6 ms a token on this alone, which at batch 64 is longer than
    a GPU decode step. The window's context tokens make tokenizers that change a sequence's first piece
    (SentencePiece drops its leading space) decode the new tokens as in the whole text; where the window
    cannot be trusted (its context decodes to nothing, or its text does not begin with the context's) the
    whole sequence is decoded instead. So it is for a tokenizer that cleans up the whole text after decoding
    (``clean_up_tokenization_spaces``: " ' s" becomes "'s" only with the space before it in view), whose
    stream also holds back a space near the end, which that cleanup could still drop.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (truncated at a stop string once found)
        self.sent = 0  # characters released
        self.stopped = False
        self._done = ""  # the text of ids[:_read], which ends in a whole character
        self._prefix = 0  # ids[_prefix:_read]: the next window's context (_prefix: the previous commit point)
        self._read = 0
        self._whole = cleans_up(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def _decoded(self) -> str:
        """The text of every id so far, decoding only the window after ``_prefix``."""
        if self._whole:
            return self._decode(self.ids)
        ids, p, r = self.ids, self._prefix, self._read
        window, head = self._decode(ids[p:]), self._decode(ids[p:r])
        # the window's new text is what follows its context's, unless the context decodes to nothing (a
        # run of special tokens: the window's first piece would lose its leading space) or is not a prefix
        ok = window.startswith(head) and (head or p == 0)
        full = self._done + window[len(head):] if ok else self._decode(ids)
        if not full.endswith("\ufffd"):  # a whole character: commit it
            self._done, self._prefix, self._read = full, r, len(ids)
        return full

    def push(self, token: int, stops: bool = True) -> str:
        """Add a token; return the newly releasable text (``stopped`` turns True at a stop string; with
        ``stops`` False, stop strings are neither searched nor held back: a completion's min_tokens)."""
        self.ids.append(int(token))
        full = self._decoded()
        for s in self.stop if stops else ():
            at = full.find(s, max(0, self.sent - len(s)))
            if at != -1:
                full, self.stopped = full[:at], True
        self.text = full
        end = len(full)
        if not self.stopped:
            if full.endswith("\ufffd"):
                return ""
            hold = max((k for s in self.stop if stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            if self._whole:  # the cleanup drops a space before up to 5 characters (" n ' t" -> "n't"): not final yet
                at = full.find(" ", max(0, len(full) - 6))
                hold = max(hold, len(full) - at if at != -1 else 0)
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
def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
               greedy: int | None = None) -> int:
    """The reference rules, one row at a time (sample_each runs them batched): the next token of one row of
    (shaped) logits (V,): the argmax (``greedy`` when already known) at a
    temperature below TEMPERATURE_FLOOR, else a draw from the temperature-scaled distribution cut by min-p,
    top-k and the smallest top-p nucleus. Raises SamplingError for logits that hold NaN or +Inf."""
    if bool((torch.isnan(logits) | torch.isposinf(logits)).any()):  # one read-back (-Inf: a banned token)
        raise SamplingError(NONFINITE)
    if params.greedy:
        return int(logits.argmax()) if greedy is None else greedy
    x = logits.float()
    probs = torch.softmax((x - x.max()) / params.temperature, dim=-1)  # max 0: no overflow at small temperatures
    if params.min_p > 0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    k = params.top_k if 0 < params.top_k < probs.shape[-1] else 0
    if params.top_p < 1.0 or k:
        sp, idx = probs.sort(descending=True)
        if k:
            sp[k:] = 0
        if params.top_p < 1.0:  # the nucleus of what min-p and top-k kept (vLLM renormalises before top-p)
            keep = sp.cumsum(0) - sp < params.top_p * sp.sum()  # tokens whose preceding mass is below p
            keep[0] = True  # the first always, also for a p that rounds to 0 in float32
            sp = sp * keep
        return int(idx[torch.multinomial(sp / sp.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_each(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                shapers: Sequence[LogitShaper | None] | None = None) -> list[int | SamplingError]:
    """Next token per row of ``logits`` (n, V), or the SamplingError of a row that failed: one bad row
    fails only itself (the server's scheduler answers that request with an error and keeps the others).
    A row with a shaper (logit bias, penalties, min_tokens) is sampled from its shaped logits. The rules are
    :func:`sample_row`'s, done for all rows at once with one host read-back (:mod:`.sample_batch`); a seeded
    row on a CPU gets sample_row's very token."""
    return sample_batch(logits, params, generators, shapers)


def sample_next(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                shapers: Sequence[LogitShaper | None] | None = None) -> list[int]:
    """Next token per row of ``logits`` (n, V) (rules: :func:`sample_row`); raises the first row's error."""
    out = sample_each(logits, params, generators, shapers)
    for x in out:
        if isinstance(x, SamplingError):
            raise x
    return out  # type: ignore[return-value]


def shaper_for(params: SamplingParams, prompt_ids: Sequence[int], end_ids: Sequence[int] | set[int]
               ) -> LogitShaper | None:
    """A sequence's LogitShaper, or None when ``params`` leave the logits as they are."""
    return LogitShaper(params, prompt_ids, end_ids) if params.shapes_logits else None


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
    and the stop string; ``sampled`` counts the EOS too (the usage vLLM and OpenAI report). Stop strings count
    from the ``min_tokens``-th token on; ``shaper`` (the sequence's penalties) sees every accepted token."""

    stream: TextStream
    eos: set[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    min_tokens: int = 0
    shaper: LogitShaper | None = None
    ended_on_eos: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def sampled(self) -> int:
        """Tokens sampled for this sequence: ``tokens`` plus the EOS that ended it, if one did."""
        return len(self.tokens) + self.ended_on_eos

    def accept(self, token: int, cache_full: bool = False) -> str:
        """Take a sampled token; return the text it makes final (with the held-back tail when it ends the
        sequence). ``cache_full``: the row has no slot left for another token."""
        if self.done:
            raise RuntimeError("accept() after the completion finished")
        if token in self.eos:
            self.finish_reason, self.ended_on_eos = "stop", True
            return self.stream.flush()
        self.tokens.append(int(token))
        if self.shaper is not None:
            self.shaper.observe(token)
        text = self.stream.push(token, stops=len(self.tokens) >= self.min_tokens)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens or cache_full:
            self.finish_reason = "length"
            text += self.stream.flush()
        return text

    @property
    def text(self) -> str:
        return self.stream.text
