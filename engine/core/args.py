"""Argument checks shared by the Python API's entry points (calibrate, evaluate, bench, prune)."""

from __future__ import annotations

from typing import Any


def whole(name: str, v: Any, low: int) -> None:
    """A TypeError unless ``v`` is an int (not a bool or a float), a ValueError unless it is >= ``low``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}={v!r} must be a whole number, not {type(v).__name__}. Fix: pass an int >= {low}")
    if v < low:
        raise ValueError(f"{name}={v} must be >= {low}. Fix: pass a whole number >= {low}")


__all__ = ["whole"]
