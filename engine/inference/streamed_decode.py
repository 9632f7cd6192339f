"""Generation with the weights in host memory: every step streams the layers to the device once for all rows.

``StreamedRuntime(model, device, max_batch=, max_len=)`` has the part of ``Runtime``'s interface that
``inference.generate`` drives (``prefill``, ``decode``, ``lengths``, ``max_len``, ``max_batch``,
``reset``), for a model too large for the device (``--weights host`` of ``generate`` and ``lm-eval``'s
generation tasks). The model stays in host memory; each prefill and each decode step builds block i on the
device (``core.streaming.LayerStream``: pinned staging, the next block prefetched on a side stream on
CUDA), runs every row through it and frees it. The KV cache (``core.model.KVCache``) and the hidden states
stay on the device.

A step therefore costs one crossing of the weights over the bus whatever the number of rows: decoding is
bound by host-to-device bandwidth (a 7B model in bf16, 13.5 GB, at ~25 GB/s pinned: about half a second a
step), so generating for many prompts together is what makes it usable; ``rows_that_fit`` says how many
rows' caches the device holds.

Prompts are left-padded to a common length (padding is masked out of attention and positions count valid
tokens only, as ``Model.forward`` with ``key_valid`` does), so all rows write each new token at the same
cache slot; the padding gets slots of its own beyond ``max_len``, which (as in the Runtime) bounds each
row's own tokens, and ``lengths`` counts them. Logits equal the in-memory model's up to the device's
arithmetic (tests/inference/test_streamed_decode.py checks greedy completions token for token against the
Runtime's).

longrope: as the Runtime, every step's logits are transformers' over the whole sequences; the step that takes a
row past the original context runs every row's tokens again from slot 0 (one more crossing of the weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerfold.core.devices import check_device, check_kv_fits, kv_cache_bytes
from layerfold.core.model import KVCache, Model, attention_mask, require_model
from layerfold.core.streaming import LayerStream

__all__ = ["StreamedRuntime", "kv_bytes_per_row", "rows_that_fit"]

# Share of the device's free memory the KV cache may take (the rest: two blocks in flight, the embedding
# table and head, one step's hidden states and logits).
KV_SHARE = 0.5


def kv_bytes_per_row(spec, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of one row's KV cache of ``max_len`` slots (every attention layer's K and V)."""
    return kv_cache_bytes(spec, 1, max_len, dtype)


def rows_that_fit(spec, max_len: int, device: str | torch.device, dtype: torch.dtype) -> int | None:
    """How many rows' caches of ``max_len`` slots fit ``KV_SHARE`` of the device's free memory (None: no
    limit worth stating, off CUDA)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(KV_SHARE * free // max(1, kv_bytes_per_row(spec, max_len, dtype)))


class StreamedRuntime:
    """Prefill and decode steps of ``model`` (in host memory, left as it is) on ``device``, a layer at a time."""

    def __init__(self, model: Model, device: str | torch.device, *, max_batch: int = 1, max_len: int | None = None,
                 dtype: torch.dtype | None = None):
        require_model(model)
        sizes = (max_batch, 2 if max_len is None else max_len)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            raise TypeError(f"max_batch={max_batch!r}, max_len={max_len!r}: whole numbers of rows and slots. Fix: pass "
                            "ints (max_len=None: the model's context, at most 2048)")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype={dtype!r} is not a floating-point torch dtype. Fix: pass torch.float32, "
                            "torch.bfloat16 or torch.float16, or None for the model's own")
        device = check_device(device)  # "nope", "meta", a GPU that is not there: refused before any work
        spec = self.spec = model.spec
        self.max_batch = max_batch
        self.max_len = min(spec.max_position, 2048) if max_len is None else max_len
        if self.max_batch < 1 or self.max_len < 2:
            raise ValueError(f"max_batch={max_batch}, max_len={max_len}: the cache needs at least one row of two "
                             "slots. Fix: pass max_batch >= 1 and max_len >= 2")
        if self.max_len > spec.max_position:
            raise ValueError(f"max_len={self.max_len} is past the model's {spec.max_position} positions. Fix: "
                             f"ask for at most {spec.max_position} prompt + new tokens")
        self.src = LayerStream(model, device, dtype or model.dtype)
        check_kv_fits(spec, self.max_batch, self.max_len, self.src.dtype, self.src.device,
                      "generate for fewer prompts at a time, or ask for fewer new tokens")
        self.device, self.dtype = self.src.device, self.src.dtype
        fit = rows_that_fit(spec, self.max_len, self.device, self.dtype)
        if fit is not None and fit < self.max_batch:
            need = kv_bytes_per_row(spec, self.max_len, self.dtype) * self.max_batch / 1024 ** 3
            raise ValueError(f"the KV cache of {self.max_batch} rows x {self.max_len} slots ({need:.1f} GiB) does not "
                             f"fit {KV_SHARE:.0%} of the free memory of {self.device} (room for {fit} rows). Fix: "
                             "generate for fewer prompts at a time, or ask for fewer new tokens")
        self.lengths: list[int] = [0] * self.max_batch  # tokens per row (its prompt and what followed; no padding)
        self._pad: list[int] = []  # each row's left padding
        self.steps = 0  # passes over the weights so far (each crosses the bus once)
        self._cache: KVCache | None = None
        self._valid: Tensor | None = None  # (n, slots) bool: False for the left padding
        self._ids: Tensor | None = None  # (n, slots) every token fed so far (longrope's recomputation)
        self._rows = 0

    def reset(self, rows: Sequence[int] | None = None, *, scrub: bool = False) -> None:
        """Forget every row (a streamed batch starts and ends together: ``rows`` must be None or all rows).
        ``scrub`` is the Runtime's; here the cache is dropped anyway (the next prefill allocates a new one)."""
        if rows is not None and sorted(rows) != list(range(self.max_batch)):
            raise ValueError("a StreamedRuntime resets all its rows at once. Fix: call reset() without rows")
        self.lengths = [0] * self.max_batch
        self._cache, self._valid, self._ids = None, None, None

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> Tensor:
        """Prompts (lists of token ids) into rows 0..n-1; fp32 logits (n, V) of each prompt's last token."""
        n = len(prompts)
        if rows is not None and list(rows) != list(range(n)):
            raise ValueError("a StreamedRuntime fills rows 0..n-1 together. Fix: pass rows=None")
        if not 1 <= n <= self.max_batch:
            fix = "pass at least one prompt" if n == 0 else f"build it with max_batch={n} or pass fewer prompts"
            raise ValueError(f"{n} prompts for a StreamedRuntime of {self.max_batch} rows. Fix: {fix}")
        toks = [self._token_ids(p, f"prompt {r}", flat=True) for r, p in enumerate(prompts)]
        lens = [len(t) for t in toks]
        if min(lens) < 1 or max(lens) >= self.max_len:
            raise ValueError(f"prompt lengths {min(lens)}..{max(lens)}: each needs 1 to {self.max_len - 1} tokens "
                             "(room for one new token). Fix: shorten the prompt or build with a larger max_len")
        T = max(lens)
        ids = torch.zeros((n, T), dtype=torch.long)
        valid = torch.zeros((n, T), dtype=torch.bool)
        for r, t in enumerate(toks):  # left padding: every row's next token goes to slot T
            ids[r, T - len(t):] = t
            valid[r, T - len(t):] = True
        # max_len bounds each row's own tokens (as the Runtime's rows); the padding takes slots beyond it, so a
        # short prompt beside a long one gets the same room as alone (its positions count its own tokens only)
        self._pad = [T - k for k in lens]
        slots = self.max_len + max(self._pad)
        check_kv_fits(self.spec, n, slots, self.dtype, self.device, "pass prompts of more even lengths together, or "
                      "fewer prompts")
        self._cache = KVCache.allocate(self.spec, n, slots, self.device, self.dtype)
        self._valid = torch.ones((n, slots), dtype=torch.bool, device=self.device)
        self._valid[:, :T] = valid.to(self.device)
        self.lengths = lens + [0] * (self.max_batch - n)
        self._rows = n
        self._ids = ids
        return self._step(ids.to(self.device))

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """One token per row (rows 0..n-1 of the prefill; an inactive row's token is computed and ignored,
        since all rows share the step); fp32 logits (n, V)."""
        if self._cache is None:
            raise ValueError("decode before prefill. Fix: call prefill(prompts) first")
        n = self._rows
        tok = self._token_ids(tokens, "decode's tokens")
        if tok.numel() != n or (active is not None and len(active) != n):
            flags = "" if active is None else f" and {len(active)} active flags"
            raise ValueError(f"{tok.numel()} tokens{flags} for {n} rows. Fix: pass one token per prefilled row (and "
                             "one active flag each)")
        if self._cache.length >= self._cache.capacity:  # every row holds max_len tokens
            raise ValueError(f"every row holds max_len={self.max_len} tokens. Fix: build with a larger max_len")
        crossing = self.spec.rope_type == "longrope" and self.spec.rope_original_max_pos in self.lengths[:n]
        self.lengths = [self._cache.length + 1 - p for p in self._pad] + [0] * (self.max_batch - n)
        self._ids = torch.cat([self._ids, tok[:, None]], 1)
        if crossing:  # a row's token goes to position original_max: its keys get the long factors (docstring)
            self._cache.length = 0
            return self._step(self._ids.to(self.device))
        return self._step(tok.to(self.device)[:, None])

    def _token_ids(self, ids: Sequence[int] | Tensor, what: str, flat: bool = False) -> Tensor:
        """``ids`` as a flat LongTensor on the host: whole numbers in [0, vocab) (an id past the embedding is a
        device-side assert on CUDA, which ends the process's use of the GPU), or a ValueError naming ``what``;
        ``flat``: a prompt, one list of ids (not a list of lists)."""
        vocab = self.spec.vocab_size
        try:
            t = ids.detach().cpu() if isinstance(ids, Tensor) else torch.as_tensor(list(ids))
        except (TypeError, ValueError, RuntimeError, OverflowError):
            t = None
        if t is None or (flat and t.dim() != 1) or (t.numel() and (t.dtype == torch.bool or t.is_floating_point()
                                                                   or t.is_complex())):
            raise ValueError(f"{what} is {str(ids)[:60]}, not a list of token ids (whole numbers). Fix: tokenize the "
                             "text with the model's own tokenizer and pass the ids")
        t = t.reshape(-1).long()
        bad = t[(t < 0) | (t >= vocab)]
        if bad.numel():
            raise ValueError(f"{what} holds token id {int(bad[0])}, outside [0, {vocab}). Fix: tokenize with the "
                             "model's own tokenizer")
        return t

    def _step(self, ids: Tensor) -> Tensor:
        """ids (n, T) at cache slot ``cache.length``: every layer streamed once; logits of the last position."""
        cache, src = self._cache, self.src
        start, T = cache.length, ids.shape[1]
        key_valid = self._valid[:, :start + T]
        positions = (key_valid.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
        h = src.embed(ids)
        ropes = src.ropes(positions, h.dtype)
        mask = attention_mask(T, start, key_valid, self.spec.sliding_window, self.device)
        for i, block in src.blocks():
            h = block(h, *src.cos_sin(ropes, i), mask, cache, i)
        cache.length += T
        self.steps += 1
        return src.logits(h[:, -1]).float()
