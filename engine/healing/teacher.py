"""The teacher's outputs for healing, with the dense model held on the device or kept in host memory.

On the device (``teacher="device"``; a CPU's mmap'd checkpoint counts as one) the global stage builds
the whole teacher once and runs it on every micro-batch (``common.teacher_states``). A teacher that does
not fit beside the student (a 7B teacher and its pruned student on a 24 GB GPU) stays in host memory
(``teacher="host"``): streaming all of it for every micro-batch would move the whole model across the bus
per step, several times the step's compute. Instead the next ``chunk`` micro-batches the loop will
draw (known in advance: the data order is a seeded permutation) run through the teacher together, layer
by layer, so its weights cross the bus once per chunk; their hidden states at the depths the phase
needs, and their logits in the global stage, are kept (in host memory on a GPU) until the loop asks for
them. Every micro-batch still runs through every block on its own, with the same operations in the same
dtype and autocast, so the outputs are the ones ``teacher_states`` gives, bit for bit on one device
(tests/healing/test_heal_teacher.py checks whole runs).

The chunk is as many micro-batches as fit ``HOST_BUDGET`` bytes (logits dominate: micro-batch x
seq_len x vocab x 2 bytes in bf16, 65 MB for 4 x 256 tokens of a 32K vocabulary), at most ``MAX_CHUNK``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from layerfold.core.streaming import LayerStream
from layerfold.healing.common import TEACHER, teacher_states

HOST_BUDGET = 4 * 1024 ** 3  # bytes of one chunk's kept outputs
MAX_CHUNK = 64  # micro-batches per teacher pass
Key = tuple[int, int]  # (epoch, position) of a micro-batch in the data order
Upcoming = Callable[[int], list[tuple[Key, Tensor]]]


def teacher_place(choice: str, teacher: LayerStream, student: Any, device: torch.device, mode: str) -> str:
    """Where the global stage holds the teacher: ``choice`` unless "auto". On CUDA "device" when training
    every parameter was chosen (that memory rule counted the whole teacher) or when the teacher and one
    and a half students' worth of bytes (weights, the changed layers' AdamW state, activations) fit 70%
    of the device; "host" otherwise. Elsewhere "device": host memory is the device."""
    if choice not in TEACHER:
        raise ValueError(f"teacher={choice!r}. Fix: use one of {', '.join(TEACHER)}")
    if choice != "auto":
        return choice
    if device.type != "cuda" or mode == "all":
        return "device"
    t_bytes = sum(v.numel() for v in teacher.state.values()) * teacher.dtype.itemsize
    s_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    have = free + torch.cuda.memory_allocated(device)
    return "device" if t_bytes + 1.5 * s_bytes <= 0.7 * have else "host"


class FeedsTeacher:
    """HealRun's side of the feed: which micro-batch was drawn (its key), the ones it will draw next, and
    the dispatch between the held teacher and the feed (attributes: t, feed, st, _perm, _batch)."""

    feed: TeacherFeed | None
    _key: Key | None = None
    _drawn: Tensor | None = None

    def _teacher(self, ids: Tensor, depths: set[int], logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
        if self.feed is None:
            return teacher_states(self.t, ids, depths, logits)
        return self.feed.states(self._key if ids is self._drawn else None, ids, depths, logits)

    def _chunked_teacher_saving(self, ids: Tensor, depths: set[int]) -> float:
        """How much less a layer step costs in training than a probe measured (the run's clock), with a feed.
        The probe streams the teacher for its one micro-batch: transfer + compute; in training n micro-batches
        share one transfer. Passes over 1 and 2 micro-batches tell the two apart: saving = transfer (1 - 1/n)."""
        if self.feed is None:
            return 0.0
        spent = []
        for n in (1, 2):
            self._tick()
            t0 = self._secs(False)
            self.feed._pass([((-1, j), ids) for j in range(n)], frozenset(depths), False)
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            self._tick()
            spent.append(self._secs(False) - t0)
            for j in range(n):
                self.feed._kept.pop((-1, j), None)
        compute = max(spent[1] - spent[0], 0.0)
        transfer = max(spent[0] - compute, 0.0)
        return transfer * (1 - 1 / self.feed._chunk_size(ids, frozenset(depths), False))

    def _upcoming(self, n: int) -> list[tuple[Key, Tensor]]:
        """The next n micro-batches ``_batch`` will draw, with their keys; the data position is left as it was.
        No more than the phase has left when its budget is in tokens (a layer phase always: its steps are
        fixed up front): the next phase wants other depths, so a pass for them would be wasted."""
        left = (self.st.get("pbudget") or [None])[0]
        if left is not None and self._drawn is not None:  # the drawn micro-batch is not counted in ptok yet
            n = min(n, max(0, math.ceil((left - self.st["ptok"]) / self._drawn.numel()) - 1))
        saved = (self.st["epoch"], self.st["pos"], self._perm, self._key, self._drawn)
        out = []
        for _ in range(n):
            ids = self._batch()
            out.append((self._key, ids))
        self.st["epoch"], self.st["pos"], self._perm, self._key, self._drawn = saved
        return out


class TeacherFeed:
    """The teacher's hidden states and logits per micro-batch, one teacher pass per chunk of upcoming
    micro-batches (see the module docstring)."""

    def __init__(self, teacher: LayerStream, upcoming: Upcoming, budget: int | None = None,
                 max_chunk: int | None = None):
        self.t, self.upcoming = teacher, upcoming
        self.budget = HOST_BUDGET if budget is None else budget
        self.max_chunk = MAX_CHUNK if max_chunk is None else max_chunk
        self.store = torch.device("cpu")  # where kept outputs wait: host memory (the device is what is short)
        self._kept: dict[Key, tuple[dict[int, Tensor], Tensor | None]] = {}
        self._what: tuple[frozenset[int], bool] | None = None
        self.passes = 0
        self.chunk = 0

    def describe(self) -> str:
        return (f"host memory; {self.passes} pass{'es' if self.passes != 1 else ''} over its layers on "
                f"{self.t.device} so far, each for up to {self.chunk or '-'} micro-batches")

    def _chunk_size(self, mb: Tensor, depths: frozenset[int], logits: bool) -> int:
        B, T = mb.shape
        width = max(l.d_out for l in self.t.spec.layers)
        per = (len(depths) * width + (self.t.spec.vocab_size if logits else 0)) * B * T * self.t.dtype.itemsize
        return max(1, min(self.max_chunk, self.budget // max(per, 1)))

    def states(self, key: Key | None, ids: Tensor, depths: set[int],
               logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
        """(hidden states at ``depths``, logits or None) of micro-batch ``ids`` drawn at ``key``; a one-off
        batch (key None: a probe) streams the teacher through ``teacher_states``."""
        if key is None:
            return teacher_states(self.t, ids, depths, logits)
        what = (frozenset(depths), logits)
        if what != self._what:  # another phase: other depths
            self._kept.clear()
            self._what = what
        if key not in self._kept:
            self._kept.clear()
            n = self._chunk_size(ids, what[0], logits)
            self.chunk = max(self.chunk, n)
            items = [(key, ids), *self.upcoming(n - 1)] if n > 1 else [(key, ids)]
            self._pass(items, what[0], logits)
        hs, lg = self._kept.pop(key)
        dev = ids.device
        return {d: h.to(dev, non_blocking=True) for d, h in hs.items()}, None if lg is None else lg.to(dev)

    @torch.no_grad()
    def _pass(self, items: list[tuple[Key, Tensor]], depths: frozenset[int], logits: bool) -> None:
        """Run every item through the teacher, layer by layer (as teacher_states does for one)."""
        t = self.t
        runs = [t.prepare(ids) for _, ids in items]
        hs = [h for h, _, _ in runs]
        out: list[dict[int, Tensor]] = [{0: self._keep(h)} if 0 in depths else {} for h in hs]
        for i, block in t.blocks(t.spec.n_layers if logits else max(depths)):
            for j, (_, ropes, mask) in enumerate(runs):
                hs[j] = block(hs[j], *t.cos_sin(ropes, i), mask, None, i)
                if i + 1 in depths:
                    out[j][i + 1] = self._keep(hs[j])
        runs.clear()
        for j, (key, _) in enumerate(items):
            self._kept[key] = (out[j], self._keep(t.logits(hs[j])) if logits else None)
            hs[j] = None  # type: ignore[call-overload]
        self.passes += 1

    def _keep(self, x: Tensor) -> Tensor:
        return x if x.device == self.store else x.to(self.store)


__all__ = ["HOST_BUDGET", "MAX_CHUNK", "TEACHER", "FeedsTeacher", "TeacherFeed", "teacher_place"]
