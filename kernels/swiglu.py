"""SwiGLU activation of the fused gate/up projection.

    y[n, j] = silu(g[n, j]) * u[n, j] = g / (1 + exp(-g)) * u

with g = gu[:, :F] and u = gu[:, F:] read from one (N, 2F) buffer (the runtime's fused gate/up
GEMM output), fp32 math, one rounding to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import interpreting, launchable, pdl, use_triton
from ._triton import gdc_launch_dependents, gdc_wait, tl, triton

__all__ = ["swiglu", "swiglu_ref"]


@triton.jit
def _swiglu_kernel(
    gu_ptr,  # *T [N, 2F] fused gate|up rows; row stride stride_gu, unit column stride
    y_ptr,  # *T [N, F] output, contiguous
    FF,  # F, the FFN width
    stride_gu,
    BLOCK: tl.constexpr,  # columns per program
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    """Program (n, b) computes y[n, b*BLOCK:(b+1)*BLOCK] = silu(gate) * up."""
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < FF
    g = tl.load(gu_ptr + n * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + n * stride_gu + FF + cols, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + n * FF + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def _swiglu_block(f: int) -> int:
    """1024 columns a program on the GPU (an elementwise kernel's usual tile; untuned, no GPU when
    written); the whole row in the interpreter, where each program costs one numpy round."""
    if interpreting():
        return triton.next_power_of_2(f)
    return 1024


def swiglu(gu: Tensor) -> Tensor:
    """silu(gate) * up for ``gu`` (..., 2F) = [gate | up]; returns (..., F) in gu's dtype."""
    if not use_triton(gu):
        return swiglu_ref(gu)
    two_f = gu.shape[-1]
    if two_f % 2:
        raise ValueError(f"swiglu: last dim {two_f} is odd. Fix: pass the fused [gate | up] projection (..., 2F)")
    f = two_f // 2
    g2 = gu.reshape(-1, two_f)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    y = torch.empty((g2.shape[0], f), device=gu.device, dtype=gu.dtype)
    if g2.shape[0] == 0 or f == 0:
        return y.view(*gu.shape[:-1], f)
    block = min(_swiglu_block(f), triton.next_power_of_2(f))
    launchable(_swiglu_kernel)[(g2.shape[0], triton.cdiv(f, block))](
        g2, y, f, g2.stride(0), BLOCK=block, num_warps=4 if not interpreting() else 1, **pdl(g2))
    return y.view(*gu.shape[:-1], f)


def swiglu_ref(gu: Tensor) -> Tensor:
    """Torch reference (and the CPU path), in gu's dtype as ``layerfold.core.model.MLP`` computes it."""
    f = gu.shape[-1] // 2
    return F.silu(gu[..., :f]) * gu[..., f:]
