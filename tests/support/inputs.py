"""Inputs for the kernel tests: activations with a nonzero mean, token masks of every kind, nan in the
padding (a kernel that reads it would show it), fp64 accumulators; the dtypes and mask kinds they run."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASKS = ["none", "random", "drop_one", "keep_one"]


def make_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int, offset: float = 0.5) -> Tensor:
    """Random activations with a nonzero mean (so sums and centring are not trivially ~0)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + offset).to(dtype)


def make_mask(kind: str, n: int, seed: int) -> Tensor | None:
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed + 1000)
    if kind == "random":
        return torch.rand(n, generator=g) < 0.6
    m = torch.ones(n, dtype=torch.bool)
    j = int(torch.randint(n, (1,), generator=g)) if n > 0 else 0
    if kind == "drop_one":
        m[j] = False
    elif kind == "keep_one":
        m[:] = False
        m[j] = True
    else:
        raise ValueError(kind)
    return m


def poison_padding(x: Tensor, mask: Tensor | None, dim: int = -2) -> Tensor:
    """Put nan in the padded tokens: a kernel that reads them would show it."""
    if mask is None or bool(mask.all()):
        return x
    x = x.clone()
    idx = torch.nonzero(~mask).reshape(-1)
    x.index_fill_(x.dim() + dim if dim < 0 else dim, idx, float("nan"))
    return x


def zeros64(*shapes: tuple[int, ...]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros(s, dtype=torch.float64) for s in shapes)
