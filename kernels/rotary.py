"""Rotary position embedding in the rotate-half layout (HF Llama), applied to many heads at once.

For a head vector x of size hd = 2h with per-token tables cos, sin (hd,) where cos[:h] = cos[h:]:

    y[:h] = x[:h] * cos[:h] - x[h:] * sin[:h]
    y[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]

i.e. y = x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x[h:], x[:h]]. fp32 math, one
rounding to x's dtype. The runtime rotates q and k in one launch: they are adjacent heads of the
fused qkv projection's output row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import launchable, use_triton
from ._triton import tl, triton

__all__ = ["rotary", "rotary_ref"]


@triton.jit
def _rotary_kernel(
    x_ptr,  # *T [N, H, HD] input; token stride stride_xn, head stride stride_xh, unit last stride
    cos_ptr,  # *T [N, HD] cos table rows of each token's position (row stride stride_cn)
    sin_ptr,  # *T [N, HD] sin table rows (same strides as cos)
    y_ptr,  # *T [N, H, HD] output, contiguous
    H,
    HALF,  # HD // 2
    stride_xn,
    stride_xh,
    stride_cn,
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_HALF: tl.constexpr,  # >= HALF, power of two
):
    """Program (n, hb) rotates heads [hb*BLOCK_H, (hb+1)*BLOCK_H) of token n."""
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    hm = heads < H
    cm = cols < HALF
    m = hm[:, None] & cm[None, :]
    c1 = tl.load(cos_ptr + n * stride_cn + cols, mask=cm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + n * stride_cn + HALF + cols, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + n * stride_cn + cols, mask=cm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + n * stride_cn + HALF + cols, mask=cm, other=0.0).to(tl.float32)
    base = x_ptr + n * stride_xn + heads[:, None].to(tl.int64) * stride_xh + cols[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    out = y_ptr + (n * H + heads[:, None].to(tl.int64)) * (2 * HALF) + cols[None, :]
    tl.store(out, y1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(out + HALF, y2.to(y_ptr.dtype.element_ty), mask=m)


def _rotary_block_h(h: int) -> int:
    """Heads per program: up to 16, so a Llama-7B token (32 heads) is two programs and a decode step
    has enough programs to fill the GPU at batch >= 8; a guess, not tuned (no GPU when written)."""
    return min(16, triton.next_power_of_2(max(h, 1)))


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (N, H, hd) with per-token ``cos``/``sin`` (N, hd); returns a contiguous (N, H, hd).

    x may be a strided view (e.g. the q and k heads inside a fused qkv output) with unit last stride.
    """
    if not use_triton(x):
        return rotary_ref(x, cos, sin)
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"rotary: x must be (N, H, hd) and cos/sin (N, hd); got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}. Fix: flatten batch and time into N")
    n, h, hd = x.shape
    if hd % 2:
        raise ValueError(f"rotary: head_dim={hd} is odd. Fix: rotary embeddings need an even head_dim")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((n, h, hd), device=x.device, dtype=x.dtype)
    if n == 0 or h == 0:
        return y
    bh = _rotary_block_h(h)
    launchable(_rotary_kernel)[(n, triton.cdiv(h, bh))](
        x, cos, sin, y, h, hd // 2, x.stride(0), x.stride(1), cos.stride(0),
        BLOCK_H=bh, BLOCK_HALF=triton.next_power_of_2(hd // 2), num_warps=1)
    return y


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Torch reference (and the CPU path): x (N, H, hd), cos/sin (N, hd), computed in x's dtype
    exactly as ``layerfold.core.model.apply_rope`` does (the Triton kernel rounds once, from fp32)."""
    h = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * c + rot * s
