"""OpenAI's response shapes: choices, streamed chunks, usage, and logprobs in both dialects.

Completions (legacy) logprobs: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` with one
entry per token (a prompt's first token has null: nothing predicts it). Chat logprobs: ``{"content":
[{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``. Log-probabilities are
the model's own distribution, before temperature and top-p.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from layerfold.inference.sampling import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs", "sse", "usage"]


def _text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs; ``offset``: where the first token's text starts in the choice's text."""
    tokens = [_text(tokenizer, e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {_text(tokenizer, i): lp for i, lp in e.top}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(token: int, lp: float | None) -> dict[str, Any]:
        t = _text(tokenizer, token)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries]}


def merge_completion_logprobs(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Append completions logprobs ``b`` to ``a`` (b's offsets already count from the choice's start)."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
