"""Triton, or a stand-in where it is not installed (macOS, Windows, CPU-only wheels).

Every kernel module imports ``triton`` and ``tl`` from here. Without Triton the ``@triton.jit``
functions become placeholders that refuse to launch, and :func:`layerfold.kernels.use_triton`
answers False, so every launcher runs its torch reference: the package imports and works on any
platform torch runs on; only the speed of the Triton paths is missing.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    AVAILABLE, WHY = True, ""
    try:  # programmatic dependent launch (Hopper and later): Triton 3.4+
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_PDL = True
    except ImportError:  # an older Triton: the kernels' PDL branch is never taken (kernels._dispatch.pdl)
        gdc_wait = gdc_launch_dependents = None
        HAS_PDL = False
except ImportError as e:  # pragma: no cover - exercised by a subprocess test that hides triton
    AVAILABLE, WHY = False, f"triton is not importable ({e})"

    class _Placeholder:
        """What ``@triton.jit`` returns without Triton: it names the problem if anything launches it."""

        def __init__(self, fn: Any):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(f"{self.__name__}: {WHY}. Fix: pip install triton (Linux x86-64), or run on "
                               "tensors whose kernels fall back to the torch reference (CPU)")

    class _Triton:
        @staticmethod
        def jit(fn: Any = None, **kw: Any) -> Any:
            return _Placeholder(fn) if fn is not None else _Placeholder

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

    class _Language:
        """Only kernel bodies (never run) and string annotations refer to it."""

        def __getattr__(self, name: str) -> Any:
            return None

    triton, tl = _Triton(), _Language()  # type: ignore[assignment]
    gdc_wait = gdc_launch_dependents = None
    HAS_PDL = False

__all__ = ["AVAILABLE", "HAS_PDL", "WHY", "gdc_launch_dependents", "gdc_wait", "tl", "triton"]
