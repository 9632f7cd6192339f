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


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name files and reports record."""
    return str(dtype).removeprefix("torch.")


__all__ = ["CANONICAL", "DTYPES", "dtype_name", "parse_dtype"]
