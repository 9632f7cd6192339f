"""Where a kernel runs: the Triton kernel (CUDA, or the CPU interpreter) or the torch reference.

Rule (DESIGN.md, Kernels contract): the Triton kernel runs when the input is on CUDA or when
``TRITON_INTERPRET=1`` is set in the environment; otherwise (plain CPU) the ``*_ref`` runs. The
variable is read at call time.

Triton itself fixes interpreter mode when it is imported: ``triton.jit`` turns a function into an
``InterpretedFunction`` or a compiled ``JITFunction`` as the decorator runs, and triton.language's
own helpers (``tl.zeros``, ``tl.sum``, ``tl.sigmoid``...) are decorated when ``triton`` is first
imported. So ``TRITON_INTERPRET=1`` must be in the environment before anything imports triton
(``import torch`` alone does not); setting it later cannot work, and :func:`launchable` says so
instead of failing deep inside the interpreter.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from ._triton import AVAILABLE, HAS_PDL

__all__ = ["interpreted", "interpreting", "launchable", "num_sms", "pdl", "use_triton"]


def interpreting() -> bool:
    """True when the environment asks for the Triton CPU interpreter (read now)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else the torch ref
    (always the torch ref where Triton is not installed)."""
    return AVAILABLE and (t.is_cuda or interpreting())


def interpreted(kernel: Any) -> bool:
    """Whether a ``@triton.jit`` kernel was decorated in interpreter mode."""
    return type(kernel).__name__ == "InterpretedFunction"


def launchable(kernel: Any) -> Any:
    """``kernel``, after checking it can run in the mode the environment asks for now."""
    if interpreting() and not interpreted(kernel):
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, but triton was imported before it was, so the kernels were "
            "built for a GPU and cannot run in the CPU interpreter. Set TRITON_INTERPRET=1 before "
            "anything imports triton (in the shell, or at the top of the repository's conftest.py), "
            "or unset it to run the torch references on CPU."
        )
    return kernel


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one
    after another, so splitting work across programs buys it nothing)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


_NO_PDL: dict[str, Any] = {}
_PDL: dict[str, Any] = {"PDL": True, "launch_pdl": True}


def pdl(t: Tensor) -> dict[str, Any]:
    """Launch keywords for the decode step's kernels: programmatic dependent launch when
    ``LAYERFOLD_PDL=1`` (read now) and ``t`` is on a Hopper or later GPU with a Triton that has it;
    else none. Under it a kernel is launched while the one before it finishes: its programs first wait
    for that kernel's writes (``gdc_wait``), then let the next launch (``gdc_launch_dependents``), so the
    launch latency between the short kernels of a batch-1 step overlaps the previous kernel's tail.
    Opt-in until a GPU run measures it (bench/gpu_suite.py's decode-sdpa part runs it beside the default)."""
    if os.environ.get("LAYERFOLD_PDL") != "1" or not HAS_PDL or not t.is_cuda or interpreting():
        return _NO_PDL
    return _PDL if _hopper(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        else _NO_PDL


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9
