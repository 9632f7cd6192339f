"""A process-wide cache of one object built from a model, which never keeps that model alive.

Streamline's dense pairs and SLM / LaCo's similarity are built from a dense model and reused by the next call
on the same model (several replacements of one window, several search targets). Held in a plain module-level
list they kept the model too: a finished prune job's dense 7B (13.8 GB) stayed on the GPU through the next job
of the process. The cached object holds the model weakly, and the slot closes and drops it when the model goes.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


class ModelSlot(list):
    """At most one object; ``keep(model, obj)`` closes the one before, and ``obj`` is closed and forgotten when
    ``model`` is freed (``obj`` must not hold ``model`` strongly, or that never happens)."""

    def keep(self, model: Any, obj: T) -> T:
        for old in self:
            old.close()
        self[:] = [obj]
        weakref.finalize(model, self._release, obj)
        return obj

    def _release(self, obj: Closable) -> None:
        obj.close()
        self[:] = [o for o in self if o is not obj]


def held(ref: weakref.ref, who: str) -> Any:
    """What a weak reference to a dense model points at, or a RuntimeError naming ``who`` if it is gone."""
    obj = ref()
    if obj is None:
        raise RuntimeError(f"{who}: its dense model is gone (it is held weakly). Fix: keep a reference to the "
                           "model while it is used")
    return obj
