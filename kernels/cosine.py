"""Token-wise cosine similarity between hidden states, summed over tokens.

ShortGPT Block Influence (k = 1: cos(h_i, h_{i+1})) and LLM-Streamline windows (cos(h_j, h_{j+k})
for k = 1..W) both reduce to: for one base activation and K others at the same tokens, the sum over
valid tokens of cos(base[t], others[k, t]). Dividing by the valid-token count is the caller's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, use_triton
from ._inputs import (
    check_acc,
    check_kernel_dtype,
    compute_dtype,
    flatten_tokens,
    new_acc,
    unit_stride,
)
from ._triton import tl, triton

__all__ = ["COS_EPS", "cosine_pairs_ref", "cosine_window_sum", "cosine_window_sum_ref", "unit_rows", "unit_rows_ref"]

# Floor on the product of the two norms: cos = <a, b> / max(||a|| ||b||, COS_EPS). A zero vector
# (or a padded token) thus has cosine 0 with everything instead of nan.
COS_EPS = 1e-12


@triton.jit
def _cosine_window_kernel(
    base_ptr,  # *T [N, D] base activations; row stride stride_bn, unit channel stride
    others_ptr,  # *T [K, N, D] compared activations; strides stride_ok, stride_on, 1
    mask_ptr,  # *i8 [N] nonzero = valid token; read only when HAS_MASK
    part_ptr,  # *f32 [n_token_blocks, K] out: per-token-block sums of cosines
    N,
    D,
    K,
    stride_bn,
    stride_ok,
    stride_on,
    eps,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[pn, k] = sum_{t in block pn, valid} <b_t, o_kt> / max(||b_t|| ||o_kt||, eps).

    Program (pn, pk) takes BLOCK_N tokens and BLOCK_K of the others and streams the channels in
    BLOCK_D chunks: each base chunk is loaded once and used against all BLOCK_K others. All
    arithmetic in fp32 (tiles are cast right after loading).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = offs_n < N
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs_n, mask=valid, other=0) != 0)
    in_k = offs_k < K
    rows_n = offs_n.to(tl.int64)

    dots = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    sq_o = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    sq_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        b = tl.load(base_ptr + rows_n[:, None] * stride_bn + offs_d[None, :],
                    mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        o_ptrs = (others_ptr + offs_k.to(tl.int64)[:, None, None] * stride_ok
                  + rows_n[None, :, None] * stride_on + offs_d[None, None, :])
        o_mask = in_k[:, None, None] & valid[None, :, None] & in_d[None, None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)  # [BK, BN, BD]
        dots += tl.sum(o * b[None, :, :], axis=2)
        sq_o += tl.sum(o * o, axis=2)
        sq_b += tl.sum(b * b, axis=1)
    # sqrt each norm before multiplying: ||a||^2 ||b||^2 overflows fp32 for massive activations.
    cos = dots / tl.maximum(tl.sqrt(sq_b)[None, :] * tl.sqrt(sq_o), eps)
    cos = tl.where(valid[None, :], cos, 0.0)
    tl.store(part_ptr + pid_n * K + offs_k, tl.sum(cos, axis=1), mask=in_k)


@triton.jit
def _unit_rows_kernel(
    x_ptr,  # *T [N, D] rows; row stride stride_x, unit column stride
    y_ptr,  # *U [N, D] out: rows; row stride stride_y, unit column stride
    D,
    stride_x,
    stride_y,
    eps,
    BLOCK_D: tl.constexpr,  # >= D, power of two: one program holds a whole row
):
    """y[n] = x[n] / max(||x[n]||, eps), fp32 math, rounded once to y's dtype; one program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
    tl.store(y_ptr + row * stride_y + cols, (x / norm).to(y_ptr.dtype.element_ty), mask=inside)


def _rows(t: Tensor, name: str) -> Tensor:
    """``t`` (..., D) as (N, D) rows sharing one row stride, without a copy (a slice of a wider buffer is
    fine); a ValueError when its leading dims are not evenly strided or its last stride is not 1."""
    d = t.shape[-1]
    n = math.prod(t.shape[:-1])
    lead = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1], strict=True) if s > 1]  # size-1: any stride
    even = all(st == lead[j + 1][0] * lead[j + 1][1] for j, (_, st) in enumerate(lead[:-1]))
    if t.stride(-1) != 1 or not even:
        raise ValueError(f"{name}: rows of shape {tuple(t.shape)} with strides {t.stride()} are not evenly "
                         "strided. Fix: pass a contiguous tensor or a slice of one along its last dim")
    rs = lead[-1][1] if lead else d
    return t.as_strided((n, d), (rs, 1), t.storage_offset())


def unit_rows(x: Tensor, dtype: torch.dtype | None = None, *, out: Tensor | None = None,
              eps: float = COS_EPS) -> Tensor:
    """x / max(||x||, eps) over the last dim, computed in fp32 and written once in ``dtype`` (default x's),
    or into ``out`` (x's shape, on x's device; a slice of a wider buffer such as calibration's window ring).

    One read of x and one write: what the torch chain (to fp32, norm, divide, cast) takes five passes for.
    """
    _check_unit_rows(x, dtype, out, eps)
    dtype = out.dtype if out is not None else dtype or x.dtype
    if not use_triton(x):
        y = unit_rows_ref(x, dtype, eps)
        return y if out is None else out.copy_(y)
    check_kernel_dtype(x, "x")
    y = torch.empty(x.shape, device=x.device, dtype=dtype) if out is None else out
    if y.numel() == 0:  # no rows, or rows of no channels: nothing to launch
        return y
    x2, y2 = _rows(unit_stride(x), "x"), _rows(y, "out")
    if x2.shape[0] > 1 and y2.stride(0) < y2.shape[1]:
        raise ValueError(f"out: rows of shape {tuple(y.shape)} with strides {y.stride()} overlap (an expanded or "
                         "broadcast tensor), so every row would be written over the others. Fix: pass a tensor that "
                         "owns its elements (torch.empty_like(x), or .clone() it)")
    block = triton.next_power_of_2(x2.shape[1])
    warps = 1 if interpreting() else (4 if block <= 2048 else 8)  # kernels/rmsnorm.py's rule for a row
    launchable(_unit_rows_kernel)[(x2.shape[0],)](x2, y2, x2.shape[1], x2.stride(0), y2.stride(0), float(eps),
                                                  BLOCK_D=block, num_warps=warps)
    return y


def _check_unit_rows(x: Tensor, dtype: torch.dtype | None, out: Tensor | None, eps: float) -> None:
    """unit_rows' arguments, checked alike on both paths: a TypeError or ValueError naming the fix."""
    if not isinstance(x, Tensor) or not (out is None or isinstance(out, Tensor)):
        raise TypeError(f"unit_rows: x and out must be tensors, not {type(x).__name__} and {type(out).__name__}. Fix: "
                        "pass torch tensors (out=None for a new one)")
    if x.dim() == 0 or not x.is_floating_point():
        raise TypeError(f"unit_rows: x is a {x.dim()}-d {x.dtype} tensor; it takes rows of floating-point numbers (at "
                        "least one dim: rows over the last). Fix: pass x.float() with a row dim")
    if out is not None:
        if tuple(out.shape) != tuple(x.shape) or out.device != x.device:
            raise ValueError(f"unit_rows: out {tuple(out.shape)} on {out.device} does not match x "
                             f"{tuple(x.shape)} on {x.device}. Fix: pass a tensor of x's shape on its device")
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"unit_rows: dtype={dtype} but out is {out.dtype}. Fix: give one of them (out's dtype "
                             "is the result's)")
    want = out.dtype if out is not None else dtype or x.dtype
    if not isinstance(want, torch.dtype) or not want.is_floating_point:
        raise TypeError(f"unit_rows: the result dtype {want!r} is not a floating-point torch dtype (unit vectors "
                        "round to 0 in integers). Fix: use torch.float32, float16 or bfloat16")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"unit_rows: eps={eps!r} must be a finite number > 0 (a zero row would give 0/0). Fix: "
                         "leave it at COS_EPS")


def unit_rows_ref(x: Tensor, dtype: torch.dtype | None = None, eps: float = COS_EPS) -> Tensor:
    """Torch reference of :func:`unit_rows` (fp64 math for fp64 input)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (xf / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(eps)).to(dtype or x.dtype)


def _cosine_blocks(n: int, d: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, BLOCK_K, num_warps).

    GPU: up to 8 others per program, 16 tokens, and channel chunks sized so the [BK, BN, BD] fp32
    tile stays at 8K elements (64 registers a thread at 4 warps); a memory-bound reduction, not yet
    tuned on a GPU (none was available when written). Interpreter: whole problem per program where
    it fits (fewer, larger numpy ops run fastest).
    """
    block_k = min(8, triton.next_power_of_2(max(k, 1)))
    if interpreting():
        block_n = min(64, triton.next_power_of_2(max(n, 1)))
        block_d = min(128, triton.next_power_of_2(max(d, 1)))
        return block_n, block_d, block_k, 4
    block_n = 16
    block_d = max(16, min(128, triton.next_power_of_2(d), 8192 // (block_k * block_n)))
    return block_n, block_d, block_k, 4


def _flatten_others(base: Tensor, others: Tensor) -> Tensor:
    if others.dim() != base.dim() + 1 or others.shape[1:] != base.shape:
        raise ValueError(
            f"others must be [K, *base.shape] = [K, {', '.join(map(str, base.shape))}] "
            f"(stack the compared activations along a new first dim); got {list(others.shape)}"
        )
    if others.device != base.device:
        raise ValueError(f"others is on {others.device} but base is on {base.device}")
    n_tokens = math.prod(base.shape[:-1])
    return unit_stride(others.reshape(others.shape[0], n_tokens, others.shape[-1]))


def cosine_window_sum(
    base: Tensor, others: Tensor, mask: Tensor | None = None, acc: Tensor | None = None, *,
    base_unit: Tensor | None = None, others_unit: bool = False,
) -> Tensor:
    """acc[k] += sum over valid t of cos(base[t], others[k, t]), cos = <a, b> / max(||a|| ||b||, 1e-12).

    base: [N, d] or [B, T, d]; others: [K, *base.shape]; fp32/fp16/bf16. mask: token-shaped,
    bool or 0/1; None = all valid. acc: [K] fp32, added into in place and returned (None: zeros).

    Hints for the CPU path (the Triton kernel normalises as it streams and ignores them):
    ``base_unit``, base already divided by its norms (a caller that needs it anyway computes it once);
    ``others_unit``, every others[k, t] is a unit vector (calibration's window ring stores directions),
    so each cosine is one dot product in others' dtype with fp32 accumulation. The reference re-normalises
    every stored direction in fp32, and fp16 -> fp32 conversion is slow on CPUs (several times slower;
    bench/bench_calibration.py --part time).
    """
    if not use_triton(base):
        if base_unit is None:
            return cosine_window_sum_ref(base, others, mask, acc)
        return _cosine_window_sum_cpu(base_unit, others, mask, acc, others_unit)
    o3 = _flatten_others(base, others)
    b2, m = flatten_tokens(base, mask, "base")
    check_kernel_dtype(b2, "base")
    check_kernel_dtype(o3, "others")
    n, d = b2.shape
    k = o3.shape[0]
    if acc is None:
        acc = new_acc((k,), base.device, torch.float32)
    check_acc(acc, (k,), base.device, "acc", triton_path=True)
    if n == 0 or k == 0:
        return acc
    block_n, block_d, block_k, warps = _cosine_blocks(n, d, k)
    token_blocks = triton.cdiv(n, block_n)
    part = torch.empty((token_blocks, k), device=base.device, dtype=torch.float32)
    launchable(_cosine_window_kernel)[(token_blocks, triton.cdiv(k, block_k))](
        b2, o3, m.view(torch.int8) if m is not None else b2, part,
        n, d, k, b2.stride(0), o3.stride(0), o3.stride(1), COS_EPS,
        HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
        num_warps=warps,
    )
    return acc.add_(part.sum(0))  # fixed-order sum of the partials: deterministic, no atomics


def _cosine_window_sum_cpu(base_unit: Tensor, others: Tensor, mask: Tensor | None, acc: Tensor | None,
                           others_unit: bool) -> Tensor:
    o3 = _flatten_others(base_unit, others)
    b2, m = flatten_tokens(base_unit, mask, "base_unit")
    k = o3.shape[0]
    if acc is None:
        acc = new_acc((k,), base_unit.device, torch.float32)
    check_acc(acc, (k,), base_unit.device, "acc", triton_path=False)
    if others_unit:
        c = torch.linalg.vecdot(o3, b2.to(o3.dtype)[None]).float()  # (K, N)
    else:
        of = o3.float()
        c = torch.linalg.vecdot(of, b2.float()[None]) / torch.linalg.vector_norm(of, dim=-1).clamp_min(COS_EPS)
    if m is not None:
        c = c.masked_fill_(~m[None], 0.0)
    return acc.add_(c.sum(-1).to(acc.dtype))


def cosine_pairs_ref(a: Tensor, b: Tensor, eps: float = COS_EPS) -> Tensor:
    """Token-wise cosine cos(a[..., t, :], b[..., t, :]) over the last dim (broadcasting), in fp32
    (fp64 if either input is fp64): <a, b> / max(||a|| ||b||, eps)."""
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dt), b.to(dt)
    denom = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return (a * b).sum(-1) / denom.clamp_min(eps)


def cosine_window_sum_ref(
    base: Tensor, others: Tensor, mask: Tensor | None = None, acc: Tensor | None = None
) -> Tensor:
    """Torch reference of :func:`cosine_window_sum`, in the accumulator's dtype (fp32 when None;
    fp64 for fp64 input)."""
    o3 = _flatten_others(base, others)
    b2, m = flatten_tokens(base, mask, "base")
    k = o3.shape[0]
    dt = compute_dtype(b2, acc)
    if acc is None:
        acc = new_acc((k,), base.device, dt)
    check_acc(acc, (k,), base.device, "acc", triton_path=False)
    if m is not None:  # indexing drops padding (and any nan it holds)
        b2, o3 = b2[m], o3[:, m]
    return acc.add_(cosine_pairs_ref(b2.to(dt)[None], o3.to(dt)).sum(-1).to(dt))
