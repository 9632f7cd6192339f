"""The tolerance table of the kernel tests, one entry per dtype, and a comparison that says where it differs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tol:
    rtol: float  # relative to the reference element
    atol: float  # relative to the largest reference magnitude (errors of fp32 sums scale with it)


# The references see the very same (exactly representable) low-precision values cast to fp64, so
# the only error left is the kernels' fp32 accumulation; the table still differs per dtype
# because fp16/bf16 inputs take the native-dtype tl.dot path on a GPU.
TOL = {
    torch.float32: Tol(rtol=2e-5, atol=2e-5),
    torch.float16: Tol(rtol=2e-5, atol=2e-5),
    torch.bfloat16: Tol(rtol=2e-5, atol=2e-5),
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """|actual - expected| <= rtol |expected| + atol max|expected|, else fail naming the worst
    element (index, both values, error and allowed error)."""
    tol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs()
    allowed = tol.rtol * e.abs() + tol.atol * scale
    excess = err - allowed
    worst = int(torch.argmax(excess))
    if excess.reshape(-1)[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int((excess > 0).sum())}/{e.numel()} elements out of tolerance; "
            f"worst at {idx}: got {a[idx].item():.9g}, expected {e[idx].item():.9g}, "
            f"error {err[idx].item():.3g} > allowed {allowed[idx].item():.3g} (max |ref| {scale:.3g})"
        )
