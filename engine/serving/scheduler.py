"""Continuous batching at step granularity: one thread owns the Runtime and serves many requests.

Each request gets a cache row ("slot") of its own. Between decode steps the scheduler thread
admits queued requests into free slots (one batched prefill for all of them), then runs one decode
step for every busy slot together; a request that finishes, hits a stop string or EOS, or is
cancelled (its client went away) frees its slot at once for the next queued request. Results flow
back as events through a callback (the HTTP layer hands them to its asyncio loop).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.inference.runtime import Runtime
from layerfold.inference.sampling import Completion, TextStream, eos_ids, sample_next

__all__ = ["Event", "QueueFull", "Request", "Scheduler"]

log = logging.getLogger("layerfold.server")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the caller should answer 429."""


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on "done"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called from the scheduler thread; must not block
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    id: int = 0
    cancelled: bool = False  # set by any thread; the scheduler frees the slot before its next step
    # filled by the scheduler
    completion: Completion | None = None
    gen: torch.Generator | None = None
    submitted: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Owns ``Runtime(model, max_batch, max_len, compile, static_batches)`` on a background thread
    (``start``/``stop``). prefill_threads: torch CPU threads for the prefills (default: the current
    count, as the decode steps): a prefill is a few large matrix products, which a core shared with the
    HTTP side slows much less than it does the many small parallel regions of a decode step."""

    def __init__(self, model: Model, tokenizer: Any, *, max_batch: int = 16, max_len: int = 1024,
                 max_queue: int = 64, compile: bool = False, static_batches: Sequence[int] = (),
                 prefill_threads: int | None = None):
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
        with self._cv:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting (max_queue={self.max_queue})")
            req.id = next(self._ids)
            req.submitted = time.perf_counter()
            self.pending.append(req)
            self._cv.notify()
        return req

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
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("scheduler step failed")
                for i, r in enumerate(self.slots):
                    if r is not None:
                        self._free(i)
                        r.emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))

    def _idle(self) -> bool:
        return all(s is None for s in self.slots)

    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._free(i)

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        batch: list[tuple[int, Request]] = []
        with self._cv:
            while free and self.pending:
                r = self.pending.popleft()
                if not r.cancelled:
                    batch.append((free.pop(0), r))
        if not batch:
            return
        for slot, r in batch:
            r.completion = Completion(TextStream(self.tokenizer, r.stop), self.eos, r.max_tokens)
            r.gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            self.slots[slot] = r
        switch = self.prefill_threads != self.threads
        if switch:
            torch.set_num_threads(self.prefill_threads)
        try:
            logits = self.runtime.prefill([r.prompt_ids for _, r in batch], rows=[s for s, _ in batch])
        finally:
            if switch:
                torch.set_num_threads(self.threads)
        nxt = sample_next(logits, [r.temperature for _, r in batch], [r.top_p for _, r in batch],
                          [r.gen for _, r in batch])
        for (slot, r), t in zip(batch, nxt, strict=True):
            self._accept(slot, r, t)

    def _step(self) -> None:
        rt = self.runtime
        hi = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        toks = [s.completion.tokens[-1] if s is not None else 0 for s in self.slots[:hi]]  # type: ignore[union-attr]
        active = [s is not None for s in self.slots[:hi]]
        logits = rt.decode(toks, active=active)
        self.steps += 1
        self.max_rows_in_step = max(self.max_rows_in_step, sum(active))
        rows = [i for i in range(hi) if active[i]]
        reqs = [self.slots[i] for i in rows]
        nxt = sample_next(logits[rows], [r.temperature for r in reqs], [r.top_p for r in reqs],  # type: ignore[union-attr]
                          [r.gen for r in reqs])  # type: ignore[union-attr]
        for i, r, t in zip(rows, reqs, nxt, strict=True):
            if r is not None and not r.cancelled:
                self._accept(i, r, t)

    def _accept(self, slot: int, r: Request, token: int) -> None:
        """Take a sampled token for the request in ``slot`` (the rules: inference.sampling.Completion)."""
        c = r.completion
        assert c is not None
        delta = c.accept(token, cache_full=self.runtime.lengths[slot] >= self.runtime.max_len)
        if delta:
            r.emit(Event("delta", text=delta))
        if c.done:
            self._free(slot)
            r.emit(Event("done", finish_reason=c.finish_reason, prompt_tokens=len(r.prompt_ids),
                         completion_tokens=len(c.tokens)))

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        self.runtime.reset([slot])
