"""Optional dependencies: what each extra brings, checked before any long work starts."""

from __future__ import annotations

import importlib.util

EXTRAS = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "plot": ("matplotlib",)}


def require(extra: str, what: str) -> None:
    """Raise a ValueError naming the missing packages and the pip command, if ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{what} needs {' and '.join(missing)}, not installed here. Fix: "
                         f"pip install 'layerfold[{extra}]'")
