"""Small helpers shared by the CLI subcommands: JSON output, tables, progress bars, dtypes, errors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_common(p: argparse.ArgumentParser, *, model: bool = True, dtype: bool = True) -> None:
    """--json, --device and (optionally) MODEL and --dtype, worded the same in every subcommand."""
    if model:
        p.add_argument("model", metavar="MODEL",
                       help="layerfold checkpoint dir, HF model dir, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--device", default="cpu", help="torch device to compute on (cpu, cuda, cuda:1); default cpu")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="weight/compute dtype; default float32")


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def progress(it: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """tqdm on stderr when it is a terminal-ish stream and enabled; the iterable itself otherwise."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))
    out = [line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.4g}" if abs(c) < 1e5 else f"{c:.3e}"
    return str(c)


def emit(args: argparse.Namespace, obj: Any, text: str | None = None) -> None:
    """Print ``obj`` as JSON with --json, else ``text`` (or JSON if no text)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_sizes(text: str, flag: str = "--batch-sizes", empty: bool = False, example: str = "1,4,16") -> list[int]:
    """A comma-separated list of positive integers (``empty``: may be empty)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
        ok = (bool(sizes) or empty) and all(x >= 1 for x in sizes)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of positive integers. Fix: e.g. "
                         f"{flag} {example}")
    return sizes
