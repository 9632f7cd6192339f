"""Where a kernel runs: the Triton kernel (CUDA, or the CPU interpreter) or the torch reference.

Rule (DESIGN.md, Kernels contract): the Triton kernel runs when the input is on CUDA or when
``TRITON_INTERPRET=1`` is set in the environment; otherwise (plain CPU) the ``*_ref`` runs.

``triton.jit`` decides *at decoration time* whether a function becomes a compiled ``JITFunction``
or an ``InterpretedFunction`` (triton 3.x reads ``TRITON_INTERPRET`` when the decorator runs, i.e.
when a ``kernels`` module is imported). So that the environment variable can be set after
``kernels`` was imported (by a test fixture, say), :func:`launchable` re-decorates a kernel for the
mode the environment asks for at call time and caches the result.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
from torch import Tensor

__all__ = ["interpreting", "launchable", "use_triton"]

_LAUNCHABLE_CACHE: dict[tuple[int, bool], Any] = {}


def interpreting() -> bool:
    """True when the Triton CPU interpreter is asked for (read at call time, not import time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else the torch ref."""
    return t.is_cuda or interpreting()


def _is_interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def launchable(kernel: Any) -> Any:
    """Return ``kernel`` as a compiled or interpreted Triton function, whichever the environment
    asks for now (see the module docstring for why this cannot be left to import time)."""
    want_interp = interpreting()
    if _is_interpreted(kernel) == want_interp:
        return kernel
    key = (id(kernel.fn), want_interp)
    fn = _LAUNCHABLE_CACHE.get(key)
    if fn is None:
        # triton.jit reads TRITON_INTERPRET right now, so this yields the wanted flavour.
        fn = triton.jit(kernel.fn)
        assert _is_interpreted(fn) == want_interp, "triton.jit ignored TRITON_INTERPRET"
        _LAUNCHABLE_CACHE[key] = fn
    return fn


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one
    after another, so splitting work across programs buys it nothing)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
