"""What a request may ask of the sampler, with the meanings vLLM and OpenAI give the names.

- ``temperature`` (below TEMPERATURE_FLOOR: greedy), ``top_p`` (the smallest nucleus of that mass),
  ``top_k`` (the k most likely tokens; 0 or -1: all), ``min_p`` (tokens at least that fraction of the most
  likely one's probability);
- ``repetition_penalty`` (HF, vLLM): every token of the prompt or the completion so far has a positive logit
  divided by it and a negative one multiplied by it (1: off);
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI, -2..2): subtracted from the logit of a token once if
  the completion holds it / once per time it does;
- ``logit_bias`` (OpenAI): added to the logits of the tokens named (-100..100; at most 300 entries);
- ``min_tokens`` (vLLM): the end-of-sequence tokens are banned, and stop strings not searched, until the
  completion holds that many tokens.

Order, as vLLM's sampler: logit bias and the min_tokens ban, the penalties, then the argmax (greedy) or
temperature, min-p, top-k and top-p before the draw. Log-probabilities reported to clients are the model's
own (before any of this), as vLLM reports by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_LOGIT_BIAS", "TEMPERATURE_FLOOR", "LogitShaper", "SamplingParamError", "SamplingParams", "shape_rows"]

# Temperatures below this sample greedily (vLLM's rule): the scaled logits of a smaller one overflow,
# and its distribution is the argmax anyway.
TEMPERATURE_FLOOR = 1e-5
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
# A repetition_penalty below this divides and multiplies as this: float32 rounds a smaller one towards 0
# (1e-300 is 0: a positive logit became +Inf and a banned one -Inf * 0 = NaN, failing the request as if the
# model had overflowed), while this still lifts every seen positive logit above every other one, in order.
REPETITION_PENALTY_FLOOR = 1e-30
_F32_MAX = torch.finfo(torch.float32).max


class SamplingParamError(ValueError):
    """A sampling setting out of its range; ``param`` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    min_tokens: int = 0

    @classmethod
    def make(cls, logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] | None = None,
             **kw: object) -> SamplingParams:
        """Build from keyword arguments, ``logit_bias`` as a {token id: bias} mapping."""
        pairs = tuple(logit_bias.items() if isinstance(logit_bias, Mapping) else logit_bias or ())
        return cls(logit_bias=pairs, **kw)  # type: ignore[arg-type]

    def check(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamError naming the first setting out of its range, with the fix."""
        def bad(param: str, why: str, fix: str) -> SamplingParamError:
            return SamplingParamError(f"{param}={getattr(self, param)!r} {why}. Fix: {fix}", param)

        if not (_number(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0", "e.g. 0 (greedy) or 0.7")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "must lie in (0, 1]", "e.g. 0.9, or 1 for no nucleus")
        if not (_whole(self.top_k) and self.top_k >= -1):
            raise bad("top_k", "must be a whole number >= -1", "e.g. 40, or 0 (or -1) for every token")
        if not (_number(self.min_p) and 0 <= self.min_p <= 1):
            raise bad("min_p", "must lie in [0, 1]", "e.g. 0.05, or 0 for no cut")
        if not (_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 100):
            raise bad("repetition_penalty", "must lie in (0, 100]", "e.g. 1.1, or 1 for none")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise bad(name, "must lie in [-2, 2]", "e.g. 0.5, or 0 for none")
        if not (_whole(self.min_tokens) and self.min_tokens >= 0):
            raise bad("min_tokens", "must be a whole number >= 0", "e.g. 0")
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamError(f"logit_bias holds more than {MAX_LOGIT_BIAS} entries. Fix: bias at most "
                                     f"{MAX_LOGIT_BIAS} tokens", "logit_bias")
        top = vocab_size if vocab_size is not None else 2 ** 63
        for pair in self.logit_bias:
            t, b = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if not (_whole(t) and 0 <= t < top):
                raise SamplingParamError(f"logit_bias names the token {t!r}, which is not an id in [0, {top}). Fix: "
                                         "use this model's tokenizer's ids", "logit_bias")
            if not (_number(b) and -100 <= b <= 100):
                raise SamplingParamError(f"logit_bias gives token {t} the bias {b!r}; biases lie in [-100, 100]. "
                                         "Fix: e.g. -100 to ban the token, 100 to force it", "logit_bias")

    @property
    def greedy(self) -> bool:
        return not self.temperature >= TEMPERATURE_FLOOR

    @property
    def shapes_logits(self) -> bool:
        """True when the logits change before the argmax or the draw (anything but temperature and the cuts)."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens)


class LogitShaper:
    """One sequence's logit bias, min_tokens ban and penalties: ``shaper(row)`` gives the shaped float32
    copy of its logits (V,), ``observe(token)`` records each accepted token. The token counts live on the
    logits' device, made on first use (presence and frequency penalties: a float per vocabulary entry)."""

    def __init__(self, params: SamplingParams, prompt_ids: Iterable[int] = (), end_ids: Iterable[int] = ()):
        self.p = params
        self.prompt = list(prompt_ids) if params.repetition_penalty != 1 else []
        self.end = sorted(set(end_ids))
        self.generated = 0
        self._pending: list[int] = []  # accepted before the tensors exist
        self.counts: Tensor | None = None  # (V,) times each token was generated
        self.seen: Tensor | None = None  # (V,) in the prompt or generated
        self._bias: tuple[Tensor, Tensor] | None = None
        self._bias_host: tuple[list[int], list[float]] = ([], [])  # the same pairs, for shape_rows' flat indices
        self._end_idx: Tensor | None = None
        self._made = False

    def _make(self, row: Tensor) -> None:
        V, dev, p = row.shape[-1], row.device, self.p
        self.end = [t for t in self.end if 0 <= t < V]  # (a tokenizer's EOS past the model's vocabulary: never drawn)
        self._end_idx = torch.tensor(self.end, dtype=torch.long, device=dev)  # made once, not copied every step
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(V, dtype=torch.float32, device=dev)
        if p.repetition_penalty != 1:
            self.seen = torch.zeros(V, dtype=torch.bool, device=dev)
            if self.prompt:
                self.seen[torch.tensor(self.prompt, device=dev)] = True
        if p.logit_bias:
            merged: dict[int, float] = {}
            for t, b in p.logit_bias:  # a token named twice: the last bias, as a JSON object's last key
                merged[t] = float(b)
            self._bias = (torch.tensor(list(merged), device=dev), torch.tensor(list(merged.values()), device=dev))
            self._bias_host = (list(merged), list(merged.values()))
        for t in self._pending:
            self._count(t)
        self._pending.clear()
        self._made = True

    def _count(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def observe(self, token: int) -> None:
        self.generated += 1
        if not self._made:
            self._pending.append(int(token))
        else:
            self._count(int(token))

    def __call__(self, row: Tensor) -> Tensor:
        if not self._made:
            self._make(row)
        x = row.to(torch.float32, copy=True)
        p = self.p
        if self._bias is not None:
            x.index_add_(0, self._bias[0], self._bias[1])
        if self.generated < p.min_tokens and self.end:
            x[self._end_idx] = -math.inf
        if self.seen is not None:
            rp = max(p.repetition_penalty, REPETITION_PENALTY_FLOOR)
            x = torch.where(self.seen, torch.where(x > 0, x / rp, x * rp), x)
        if self.counts is not None:
            x -= self.counts * p.frequency_penalty + (self.counts > 0).float() * p.presence_penalty
        return x.clamp_(max=_F32_MAX)  # a huge logit lifted further stays finite (the ban's -Inf stays)


def _to(x: Tensor, dev: torch.device) -> Tensor:
    """A host tensor on ``dev`` without a host sync (a blocking copy to a GPU waits for its queue)."""
    return x.to(dev, non_blocking=True)


def shape_rows(x: Tensor, rows: list[tuple[int, LogitShaper]]) -> None:
    """Shape the rows ``i`` of ``x`` (n, V) float32 in place as ``shaper(x[i])`` would, for all of them at once:
    a fixed number of launches and no host sync (bias and bans as flat indices built on the host, the seen
    masks and counts stacked). Each shaper must be made (``_make``) already. Bit-identical on a CPU."""
    n, V = x.shape
    dev, flat = x.device, x.view(-1)
    bias_at: list[int] = []
    bias_by: list[float] = []
    ban: list[int] = []
    for i, sh in rows:
        t, b = sh._bias_host
        bias_at += [i * V + j for j in t]
        bias_by += b
        if sh.generated < sh.p.min_tokens and sh.end:
            ban += [i * V + e for e in sh.end]
    if bias_at:
        flat.index_add_(0, _to(torch.tensor(bias_at), dev), _to(torch.tensor(bias_by, dtype=torch.float32), dev))
    if ban:
        flat.index_fill_(0, _to(torch.tensor(ban), dev), -math.inf)
    pen = [(i, sh) for i, sh in rows if sh.seen is not None or sh.counts is not None]
    if pen:
        idx = [i for i, _ in pen]
        whole = idx == list(range(n))
        at = None if whole else _to(torch.tensor(idx), dev)
        xr = x if at is None else x.index_select(0, at)
        if any(sh.seen is not None for _, sh in pen):
            none = torch.zeros(V, dtype=torch.bool, device=dev)
            seen = torch.stack([sh.seen if sh.seen is not None else none for _, sh in pen])
            rp = _to(torch.tensor([[max(sh.p.repetition_penalty, REPETITION_PENALTY_FLOOR)] for _, sh in pen],
                                  dtype=torch.float32), dev)
            xr = torch.where(seen, torch.where(xr > 0, xr / rp, xr * rp), xr)
        if any(sh.counts is not None for _, sh in pen):
            zero = torch.zeros(V, dtype=torch.float32, device=dev)
            counts = torch.stack([sh.counts if sh.counts is not None else zero for _, sh in pen])
            fp_pp = _to(torch.tensor([[float(sh.p.frequency_penalty if sh.counts is not None else 0),
                                       float(sh.p.presence_penalty if sh.counts is not None else 0)]
                                      for _, sh in pen], dtype=torch.float32), dev)
            xr = xr - (counts * fp_pp[:, :1] + (counts > 0).float() * fp_pp[:, 1:])
        if at is None:
            x.copy_(xr)
        else:
            x.index_copy_(0, at, xr)
    x.clamp_(max=_F32_MAX)  # (rows without a shaper: finite ones are unchanged, others fail anyway)
