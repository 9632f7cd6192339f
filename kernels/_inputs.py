"""Input checks shared by the launchers: token flattening, padding masks, accumulators."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "KERNEL_DTYPES",
    "check_acc",
    "check_kernel_dtype",
    "compute_dtype",
    "flatten_tokens",
    "new_acc",
    "unit_stride",
]

# Input dtypes the Triton kernels read; they accumulate in fp32 whatever the input.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unit_stride(x: Tensor) -> Tensor:
    """``x`` with a unit last-dim stride: a copy only when the last dim is strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


def flatten_tokens(
    x: Tensor, mask: Tensor | None, name: str = "x"
) -> tuple[Tensor, Tensor | None]:
    """Flatten ``x`` of shape [N, d] or [B, T, d] to [N, d] and ``mask`` ([N] or [B, T], bool or
    0/1; nonzero means a valid token) to a bool [N] on ``x``'s device. No copy unless needed."""
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be [N, d] or [B, T, d] (tokens by channels); got shape {tuple(x.shape)}"
        )
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    return unit_stride(x2), _flat_mask(mask, lead, x2.shape[0], x.device, name)


def _flat_mask(
    mask: Tensor | None, lead: tuple[int, ...], n: int, device: torch.device, name: str
) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) not in (lead, (n,)):
        raise ValueError(
            f"mask must have the token shape of {name} ({list(lead)} or [{n}]); "
            f"got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but {name} is on {device}; move it with .to()")
    m = mask.reshape(n)
    return m if m.dtype == torch.bool else m != 0


def check_kernel_dtype(x: Tensor, name: str) -> None:
    """The Triton kernels read fp32, fp16 and bf16 only."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; the Triton kernels read float32, float16 or bfloat16 "
            f"(cast with .float(), or call the *_ref function for float64)"
        )


def compute_dtype(x: Tensor, acc: Tensor | None) -> torch.dtype:
    """Reference arithmetic dtype: the accumulator's if given, else fp64 for fp64 input, else fp32."""
    if acc is not None:
        return acc.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def new_acc(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.zeros(shape, device=device, dtype=dtype)


def check_acc(
    acc: Tensor, shape: tuple[int, ...], device: torch.device, name: str, triton_path: bool
) -> None:
    """An accumulator the launcher adds into in place: right shape and device; for the Triton
    path also fp32 and contiguous (the kernels write through raw pointers)."""
    if tuple(acc.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {list(acc.shape)}")
    if acc.device != device:
        raise ValueError(f"{name} is on {acc.device} but the input is on {device}")
    if triton_path:
        if acc.dtype != torch.float32:
            raise TypeError(
                f"{name} must be float32 for the Triton kernels; got {acc.dtype} "
                f"(allocate it with dtype=torch.float32 or pass acc=None)"
            )
        if not acc.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous: the kernel adds into it in place "
                f"(allocate a contiguous buffer, or pass acc=None and add the result yourself)"
            )
