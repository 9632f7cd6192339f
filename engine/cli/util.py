"""Small helpers shared by the CLI subcommands: common options, JSON output, size lists."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from layerfold.core.dtypes import CANONICAL, DTYPES, parse_dtype
from layerfold.core.paths import json_safe


def add_common(p: argparse.ArgumentParser, *, model: bool = True, dtype: bool = True) -> None:
    """--json, --device and (optionally) MODEL and --dtype, worded the same in every subcommand."""
    if model:
        p.add_argument("model", metavar="MODEL",
                       help="layerfold checkpoint dir, HF model dir, .gguf file, alias (smollm2-135m), or Hub id "
                            "(org/name: from the HF cache, downloaded when online)")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="load a model whose weights hold NaN or Inf (a warning instead of an error)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="torch device to compute on (cpu, cuda, cuda:1); default cpu")
    if dtype:
        add_dtype(p, default="float32")


def add_weights(p: argparse.ArgumentParser) -> None:
    """--weights: where a job holds the model while --device computes (layerfold.evaluation.streamed)."""
    p.add_argument("--weights", default="auto", choices=("auto", "device", "host"),
                   help="where the model is held: 'device'; 'host' (host memory, each layer streamed to --device "
                        "when it runs: models larger than the GPU); 'auto' = the device when the weights fit 60%% of "
                        "its free memory, else host; default auto")


def device_arg(text: str) -> str:
    """--device checked before any work (layerfold.core.devices): argparse exits 2 with the reason and the fix."""
    from layerfold.core.devices import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_dtype(p: argparse.ArgumentParser, *, default: str | None, help: str = "weight/compute dtype") -> None:
    p.add_argument("--dtype", default=default, choices=sorted(DTYPES), metavar="{" + ",".join(CANONICAL) + "}",
                   help=f"{help}; default {default or 'as stored'}")


def torch_dtype(name: str) -> torch.dtype:
    return parse_dtype(name)


def emit(args: argparse.Namespace, obj: Any, text: str | None = None) -> None:
    """Print ``obj`` as JSON with --json (non-finite numbers as null), else ``text`` (or JSON if no text)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))
    else:
        print(text)


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


def count_arg(low: int = 1) -> Any:
    """An argparse type: a whole number >= ``low``, checked before any work (argparse exits 2 naming the flag)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number. Fix: pass a whole number >= {low}"
                                             ) from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}. Fix: pass a whole number >= {low}")
        return v

    parse.__name__ = "count"
    return parse


def finite_arg(text: str) -> float:
    """An argparse type: a finite number (NaN and infinities are refused)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number. Fix: pass a number such as 0.5") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number. Fix: pass a number such as 0.5")
    return v
