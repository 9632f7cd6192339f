"""Continuous batching at step granularity: one thread owns the Runtime and serves many requests.

Each request gets a cache row ("slot") of its own. Between decode steps the scheduler thread
admits queued requests into free slots (one batched prefill for all of them), then runs one decode
step for every busy slot together; a request that finishes, hits a stop string or EOS, or is
cancelled (its client went away) frees its slot at once for the next queued request. Results flow
back as events through a callback (the HTTP layer hands them to its asyncio loop).

Isolation: ``submit`` checks everything about a request that could fail later (:func:`check_request`:
prompt ids, lengths, seed range, temperature, top-p, stop strings) and raises RequestError before it is
queued; inside the thread, whatever one request's own work raises (its generator, its prefill, its
sampling, its text) fails that request alone. Only an error of the shared decode step fails the rows in
it. Prompt-scoring requests (``max_tokens`` 0: OpenAI's echo with logprobs) take no slot.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.inference.runtime import Runtime
from layerfold.inference.sampling import (
    Completion,
    TextStream,
    TokenLogprob,
    eos_ids,
    sample_each,
    shaper_for,
    token_logprobs,
)
from layerfold.inference.scoring import prompt_logprobs
from layerfold.serving.request import (
    MAX_LOGPROBS,
    MAX_STOP,
    MAX_STOP_CHARS,
    SEED_RANGE,
    Event,
    Request,
    RequestError,
    check_request,
)

__all__ = ["MAX_LOGPROBS", "MAX_STOP", "MAX_STOP_CHARS", "SEED_RANGE", "Event", "QueueFull", "Request", "RequestError",
           "Scheduler", "check_request"]

log = logging.getLogger("layerfold.server")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the caller should answer 429."""


class Scheduler:
    """Owns ``Runtime(model, max_batch, max_len, compile, static_batches)`` on a background thread
    (``start``/``stop``). prefill_threads: torch CPU threads for the prefills (default: the current
    count, as the decode steps): a prefill is a few large matrix products, which a core shared with the
    HTTP side slows much less than it does the many small parallel regions of a decode step.
    ``on_step(rows)``, when set, is called after every decode step with the rows it served (metrics)."""

    def __init__(self, model: Model, tokenizer: Any, *, max_batch: int = 16, max_len: int = 1024,
                 max_queue: int = 64, compile: bool = False, static_batches: Sequence[int] = (),
                 prefill_threads: int | None = None):
        self.model = model  # prompt scoring runs the model's own forward (layerfold.inference.scoring)
        self.runtime = Runtime(model, max_batch=max_batch, max_len=max_len, compile=compile,
                               static_batches=static_batches)
        self.runtime.warm_up_graphs()  # GPU: every batch bucket's graph before the first request
        self.threads = torch.get_num_threads()  # the decode steps' (compiled graphs keep the count they got)
        self.prefill_threads = prefill_threads or self.threads
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.max_queue = max_queue
        self.slots: list[Request | None] = [None] * max_batch
        self.pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run (for /health and tests)
        self.max_rows_in_step = 0  # the largest batch a decode step has served
        self.on_step: Callable[[int], None] | None = None

    # ---- control (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="layerfold-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for r in list(self.pending) + [s for s in self.slots if s is not None]:
            r.emit(Event("error", text="the server is shutting down"))
        self.pending.clear()
        self.slots = [None] * len(self.slots)

    def submit(self, req: Request) -> Request:
        return self.submit_all([req])[0]

    def submit_all(self, reqs: Sequence[Request]) -> list[Request]:
        """Queue every request or none: RequestError (checked first) or QueueFull when they do not all fit."""
        for r in reqs:
            check_request(r, self.runtime.spec.vocab_size, self.runtime.max_len)
        with self._cv:
            if len(self.pending) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting (max_queue={self.max_queue})")
            now = time.perf_counter()
            for r in reqs:
                r.id, r.submitted = next(self._ids), now
                self.pending.append(r)
            self._cv.notify()
        return list(reqs)

    def stats(self) -> dict[str, int]:
        return {"active": sum(s is not None for s in self.slots), "queued": len(self.pending),
                "slots": len(self.slots), "steps": self.steps, "max_rows_in_step": self.max_rows_in_step,
                "threads": self.threads, "prefill_threads": self.prefill_threads}

    # ---- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while self._running and not self.pending and self._idle():
                    self._cv.wait(timeout=1.0)
                if not self._running:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if not self._idle():
                    self._step()
            except Exception as e:  # the shared decode step failed: its rows fail, never the server
                log.exception("scheduler step failed")
                for i, r in enumerate(self.slots):
                    if r is not None:
                        self._fail(i, r, f"generation failed: {type(e).__name__}: {e}")

    def _idle(self) -> bool:
        return all(s is None for s in self.slots)

    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._free(i)

    def _fail(self, slot: int | None, r: Request, message: str) -> None:
        """End one request with an error event (freeing its slot); the others go on."""
        if slot is not None and self.slots[slot] is r:
            self._free(slot, scrub=True)  # its cache may hold NaN/Inf: zeroed, so the row's next sequence is unharmed
        r.emit(Event("error", text=message))

    def _take(self) -> tuple[list[Request], list[tuple[int, Request]]]:
        """From the queue, in order: prompt-scoring requests (no slot; at most max_batch a round, so decode
        steps keep their pace) and generation requests for the free slots."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        scoring: list[Request] = []
        batch: list[tuple[int, Request]] = []
        waiting: deque[Request] = deque()
        with self._cv:
            while self.pending and (free or len(scoring) < len(self.slots)):
                r = self.pending.popleft()
                if r.cancelled:
                    continue
                if r.max_tokens == 0 and len(scoring) < len(self.slots):
                    scoring.append(r)
                elif r.max_tokens > 0 and free:
                    batch.append((free.pop(0), r))
                else:
                    waiting.append(r)
            self.pending.extendleft(reversed(waiting))
        return scoring, batch

    def _admit(self) -> None:
        scoring, batch = self._take()
        for r in scoring:
            if self._score(r):
                r.emit(Event("done", finish_reason="length", prompt_tokens=len(r.prompt_ids),
                             latency_s=time.perf_counter() - r.submitted))
        ready: list[tuple[int, Request]] = []
        for slot, r in batch:
            try:
                end = (set() if r.ignore_eos else set(self.eos)) | set(r.stop_token_ids)
                params = r.sampling = r.params()  # built once: _sample reads it every step
                r.completion = Completion(TextStream(self.tokenizer, r.stop), end, r.max_tokens,
                                          min_tokens=params.min_tokens, shaper=shaper_for(params, r.prompt_ids, end))
                r.gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            except (ValueError, RuntimeError, OverflowError, TypeError) as e:
                self._fail(None, r, f"the request could not start: {type(e).__name__}: {e}")
                continue
            if r.prompt_logprobs and not self._score(r):
                continue
            self.slots[slot] = r
            ready.append((slot, r))
        if not ready:
            return
        # a prompt in the batch twice (n choices of one request) is prefilled once; its copies get its cache
        src_of: dict[tuple[int, ...], int] = {}  # a prompt -> the position in ready of its first request
        for j, (_, r) in enumerate(ready):
            src_of.setdefault(tuple(r.prompt_ids), j)
        if len(src_of) < len(ready):
            firsts = sorted(src_of.values())
            logits = self._prefill([ready[j] for j in firsts])
            if logits is not None:  # (else: the whole batch below, then each prompt alone)
                src = [src_of[tuple(r.prompt_ids)] for _, r in ready]
                for j in firsts:
                    dup = [ready[i][0] for i in range(len(ready)) if src[i] == j and i != j]
                    if dup:
                        self.runtime.copy_rows(ready[j][0], dup)
                row = {j: k for k, j in enumerate(firsts)}
                self._sample([s for s, _ in ready], [r for _, r in ready], logits[[row[i] for i in src]])
                return
        logits = self._prefill(ready)
        if logits is None:  # the batch failed as a whole: each prompt alone, so only a faulty one fails
            for slot, r in list(ready):
                one = self._prefill([(slot, r)])
                if one is None:
                    self._fail(slot, r, "the prompt could not be processed (prefill failed)")
                else:
                    self._sample([slot], [r], one)
            return
        self._sample([s for s, _ in ready], [r for _, r in ready], logits)

    def _score(self, r: Request) -> bool:
        """Emit the prompt's logprobs ("prompt" event); False (and the request failed) when that fails."""
        try:
            lps = prompt_logprobs(self.model, r.prompt_ids, r.logprobs or 0)
        except (ValueError, RuntimeError) as e:
            log.exception("prompt scoring failed")
            self._fail(None, r, f"scoring the prompt failed: {e}")
            return False
        r.emit(Event("prompt", logprobs=lps, prompt_tokens=len(r.prompt_ids)))
        return True

    def _prefill(self, batch: list[tuple[int, Request]]) -> torch.Tensor | None:
        switch = self.prefill_threads != self.threads
        if switch:
            torch.set_num_threads(self.prefill_threads)
        try:
            return self.runtime.prefill([r.prompt_ids for _, r in batch], rows=[s for s, _ in batch])
        except (ValueError, RuntimeError, IndexError) as e:
            log.warning("prefill of %d prompts failed: %s", len(batch), e)
            return None
        finally:
            if switch:
                torch.set_num_threads(self.threads)

    def _step(self) -> None:
        rt = self.runtime
        hi = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        toks = [s.completion.tokens[-1] if s is not None else 0 for s in self.slots[:hi]]  # type: ignore[union-attr]
        active = [s is not None for s in self.slots[:hi]]
        logits = rt.decode(toks, active=active)
        self.steps += 1
        rows = [i for i in range(hi) if active[i]]
        self.max_rows_in_step = max(self.max_rows_in_step, len(rows))
        if self.on_step is not None:
            self.on_step(len(rows))
        self._sample(rows, [self.slots[i] for i in rows], logits[rows])  # type: ignore[misc]

    def _sample(self, slots: list[int], reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample and accept one token per row; a row whose sampling or text fails fails alone."""
        nxt = sample_each(logits, [r.sampling or r.params() for r in reqs], [r.gen for r in reqs],
                          [r.completion.shaper if r.completion is not None else None for r in reqs])
        for j, (slot, r, t) in enumerate(zip(slots, reqs, nxt, strict=True)):
            if r.cancelled:  # e.g. during its prefill: free the slot now, before a step reads its (no) tokens
                if self.slots[slot] is r:
                    self._free(slot)
                continue
            if isinstance(t, Exception):
                self._fail(slot, r, str(t))
                continue
            try:
                if r.logprobs is not None:
                    r.pending_lp.append(token_logprobs(logits[j], t, r.logprobs))
                self._accept(slot, r, t)
            except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as e:  # e.g. the tokenizer's decode
                log.exception("accepting a token failed")
                self._fail(slot, r, f"generation failed: {type(e).__name__}: {e}")

    def _accept(self, slot: int, r: Request, token: int) -> None:
        """Take a sampled token for the request in ``slot`` (the rules: inference.sampling.Completion)."""
        c = r.completion
        assert c is not None
        if r.first_token is None:
            r.first_token = time.perf_counter()
        delta = c.accept(token, cache_full=self.runtime.lengths[slot] >= self.runtime.max_len)
        if delta:
            r.emit(Event("delta", text=delta, logprobs=self._logprobs(r)))
        if c.done:
            self._free(slot)
            now = time.perf_counter()
            r.emit(Event("done", finish_reason=c.finish_reason, prompt_tokens=len(r.prompt_ids),
                         completion_tokens=c.sampled, logprobs=self._logprobs(r),
                         ttft_s=r.first_token - r.submitted, latency_s=now - r.submitted))

    @staticmethod
    def _logprobs(r: Request) -> list[TokenLogprob] | None:
        """The logprobs of the tokens sampled since the last event (text held back waits for its tokens; as in
        vLLM, an EOS token that ends the completion has an entry though it adds no text)."""
        if r.logprobs is None:
            return None
        out = list(r.pending_lp)
        r.pending_lp.clear()
        return out

    def _free(self, slot: int, scrub: bool = False) -> None:
        self.slots[slot] = None
        self.runtime.reset([slot], scrub=scrub)
