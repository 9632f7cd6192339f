"""Optional dependencies: what each extra brings, checked before any long work starts."""

from __future__ import annotations

import importlib.util

EXTRAS = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "plot": ("matplotlib",), "lm-eval": ("lm_eval",)}


def require(extra: str, what: str) -> None:
    """Raise a ValueError naming the missing packages and the pip command, if ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{what} needs {' and '.join(missing)}, not installed here. Fix: "
                         f"pip install 'layerfold[{extra}]'")


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "triton")) -> dict[str, str | None]:
    """Versions of layerfold, Python and ``names`` (None where not installed): what a report needs to be
    reproduced."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from layerfold import __version__

    out: dict[str, str | None] = {"layerfold": __version__, "python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out
