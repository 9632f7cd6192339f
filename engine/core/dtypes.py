"""The one table of dtypes: names a user may type, and the name layerfold writes for each."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
CANONICAL = ("float32", "bfloat16", "float16")  # what --dtype help lists and what files record


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` from "bfloat16"/"bf16" (or a dtype, returned as is); a clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(CANONICAL)} (or fp32, bf16, fp16). Fix: pass "
                         "one of them")
    return DTYPES[name]


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``parse_dtype`` that also refuses a torch dtype layerfold does not compute in (int8, float64, ...) and a
    value that is no dtype at all, naming the fix."""
    if not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"dtype={dtype!r} must be a name or a torch dtype, not {type(dtype).__name__}. Fix: pass "
                        f"one of {', '.join(CANONICAL)} (or torch.float32 / torch.bfloat16 / torch.float16)")
    dt = parse_dtype(dtype)
    if dt not in DTYPES.values():
        raise ValueError(f"dtype {dtype_name(dt)} is not one layerfold computes in. Fix: pass one of "
                         f"{', '.join(CANONICAL)}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name files and reports record."""
    return str(dtype).removeprefix("torch.")


__all__ = ["CANONICAL", "DTYPES", "check_dtype", "dtype_name", "parse_dtype"]
