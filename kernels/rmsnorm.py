"""RMSNorm over the last dimension (the runtime's pre-attention, pre-MLP, final and q/k norms).

    y[n, :] = x[n, :] / sqrt(mean_j x[n, j]^2 + eps) * w[:]

computed in fp32 whatever the input dtype and rounded once to the input dtype (the same math as
``layerfold.core.model.RMSNorm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, pdl, use_triton
from ._triton import gdc_launch_dependents, gdc_wait, tl, triton

__all__ = ["add_rmsnorm", "add_rmsnorm_ref", "rmsnorm", "rmsnorm_ref"]


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # *T [N, D] input rows; row stride stride_x, unit column stride
    w_ptr,  # *T [D] scale
    y_ptr,  # *T [N, D] output rows, contiguous
    D,
    stride_x,
    eps,
    BLOCK_D: tl.constexpr,  # >= D, power of two: one program holds a whole row
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    """y[n] = x[n] * rsqrt(mean(x[n]^2) + eps) * w, one program per row, fp32 math."""
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(y_ptr + row * D + cols, (x * inv * w).to(y_ptr.dtype.element_ty), mask=inside)


def _rmsnorm_warps(block_d: int) -> int:
    """Warps per row: 4 up to 2048 channels and 8 above; the layer-norm tutorial's rule of thumb
    (one warp per ~512 fp32 values); not tuned here (no GPU when written)."""
    if interpreting():
        return 1
    return 4 if block_d <= 2048 else 8


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` (..., D) with ``weight`` (D,); returns a new tensor of x's shape and dtype."""
    if not use_triton(x):
        return rmsnorm_ref(x, weight, eps)
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rmsnorm: weight has shape {tuple(weight.shape)} but x has {d} channels. "
                         "Fix: pass the norm weight of this layer")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], d), device=x.device, dtype=x.dtype)
    if x2.shape[0] == 0:
        return y.view(x.shape)
    block = triton.next_power_of_2(d)
    launchable(_rmsnorm_kernel)[(x2.shape[0],)](
        x2, weight.contiguous(), y, d, x2.stride(0), float(eps), BLOCK_D=block, num_warps=_rmsnorm_warps(block),
        **pdl(x2))
    return y.view(x.shape)


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Torch reference (and the CPU path): one fused ``F.rms_norm`` call, fp32 accumulation inside,
    bit-identical to ``layerfold.core.model.RMSNorm`` for fp32 and bf16."""
    if x.dtype == torch.float64:
        xf = x
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@triton.jit
def _add_rmsnorm_kernel(
    h_ptr,  # *T [N, D] residual rows, updated in place to h + y; contiguous
    y_ptr,  # *T [N, D] branch output rows, contiguous
    w_ptr,  # *T [D] scale of the norm that reads the sum
    x_ptr,  # *T [N, D] out: rmsnorm(h + y) * w, contiguous
    D,
    eps,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    """h[n] <- round(h[n] + y[n]); x[n] = h[n] * rsqrt(mean(h[n]^2) + eps) * w (fp32 math)."""
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    off = row * D + cols
    s = tl.load(h_ptr + off, mask=inside, other=0.0).to(tl.float32) + tl.load(y_ptr + off, mask=inside,
                                                                              other=0.0).to(tl.float32)
    s = s.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + off, s, mask=inside)
    sf = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / D + eps)
    tl.store(x_ptr + off, (sf * inv * w).to(x_ptr.dtype.element_ty), mask=inside)


def add_rmsnorm(h: Tensor, y: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The decode step's residual add and the next norm in one pass: ``h += y`` (in place, rounded to
    h's dtype as a plain add is) and return ``rmsnorm(h, weight)``. h, y: (N, D) contiguous."""
    if not use_triton(h):
        return add_rmsnorm_ref(h, y, weight, eps)
    n, d = h.shape
    if y.shape != h.shape or weight.shape != (d,) or not (h.is_contiguous() and y.is_contiguous()):
        raise ValueError(f"add_rmsnorm: h {tuple(h.shape)}, y {tuple(y.shape)}, weight {tuple(weight.shape)}: "
                         "need contiguous (N, D), (N, D), (D,)")
    x = torch.empty_like(h)
    if n == 0:
        return x
    block = triton.next_power_of_2(d)
    launchable(_add_rmsnorm_kernel)[(n,)](h, y, weight, x, d, float(eps), BLOCK_D=block,
                                         num_warps=1 if interpreting() else _rmsnorm_warps(block), **pdl(h))
    return x


def add_rmsnorm_ref(h: Tensor, y: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Torch reference: ``h.add_(y)`` then :func:`rmsnorm_ref`."""
    h.add_(y)
    return rmsnorm_ref(h, weight, eps)
