"""The decode step's q/k/v epilogue in one launch: per-head q/k RMSNorm (Qwen3), rotary, KV-cache write.

For each row b (one new token at cache slot pos[b]) of the fused projection qkv = [q heads | k heads |
v heads] (n_heads + 2 n_kv heads of hd values):

    q'[b, h] = rope(norm_q(q[b, h]))                    (returned, (n, n_heads, hd))
    K[b, j, pos[b]] = rope(norm_k(k[b, j]));  V[b, j, pos[b]] = v[b, j]

rope in the rotate-half layout with the tables' row pos[b] (kernels/rotary.py); the norms only with
``q_norm``/``k_norm`` (each rounded to the dtype before rotating, as the model does). One program per
(row, head): the separate rotary launch and the two cache scatters of the unfused step become one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, pdl, use_triton
from ._triton import gdc_launch_dependents, gdc_wait, tl, triton

__all__ = ["rope_cache", "rope_cache_ref"]


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,  # *T [N, (NH + 2 NKV) HD] fused projection rows, row stride stride_qkv
    cos_ptr,  # *T [S, HD] rotary cos table (a row per cache slot), contiguous
    sin_ptr,  # *T [S, HD] rotary sin table
    pos_ptr,  # *i64 [N] cache slot of each row's new token
    qn_ptr,  # *T [HD] q norm weight (read when HAS_NORM)
    kn_ptr,  # *T [HD] k norm weight (read when HAS_NORM)
    q_ptr,  # *T [N, NH, HD] out: rotated queries, contiguous
    k_ptr,  # *T [B, NKV, S, HD] key cache; strides stride_cb, stride_ch, stride_cs, 1
    v_ptr,  # *T [B, NKV, S, HD] value cache, same strides
    NH,
    NKV,
    HD,
    stride_qkv,
    stride_cb,
    stride_ch,
    stride_cs,
    eps,
    HAS_NORM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # >= HD // 2, power of two
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HD // 2
    cols = tl.arange(0, BLOCK_HALF)
    cm = cols < half
    row = qkv_ptr + b * stride_qkv
    pos = tl.load(pos_ptr + b).to(tl.int64)
    if head < NH + NKV:  # a q head (head < NH) or a k head: normalise, rotate
        x1 = tl.load(row + head * HD + cols, mask=cm, other=0.0).to(tl.float32)
        x2 = tl.load(row + head * HD + half + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_NORM:
            if head < NH:
                w1 = tl.load(qn_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                w2 = tl.load(qn_ptr + half + cols, mask=cm, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(kn_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                w2 = tl.load(kn_ptr + half + cols, mask=cm, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD + eps)
            x1 = (x1 * inv * w1).to(q_ptr.dtype.element_ty).to(tl.float32)
            x2 = (x2 * inv * w2).to(q_ptr.dtype.element_ty).to(tl.float32)
        c1 = tl.load(cos_ptr + pos * HD + cols, mask=cm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * HD + half + cols, mask=cm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * HD + cols, mask=cm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * HD + half + cols, mask=cm, other=0.0).to(tl.float32)
        y1 = (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty)
        y2 = (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty)
        if head < NH:
            out = q_ptr + (b * NH + head) * HD
        else:
            out = k_ptr + b * stride_cb + (head - NH) * stride_ch + pos * stride_cs
        tl.store(out + cols, y1, mask=cm)
        tl.store(out + half + cols, y2, mask=cm)
    else:  # a v head: copy into the cache
        j = head - NH - NKV
        src = row + (NH + NKV + j) * HD
        dst = v_ptr + b * stride_cb + j * stride_ch + pos * stride_cs
        tl.store(dst + cols, tl.load(src + cols, mask=cm, other=0.0), mask=cm)
        tl.store(dst + half + cols, tl.load(src + half + cols, mask=cm, other=0.0), mask=cm)


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, *,
               n_heads: int, n_kv: int, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
               eps: float = 1e-6) -> Tensor:
    """See the module docstring. qkv (n, (n_heads + 2 n_kv) hd); cos/sin (S, hd) tables indexed by
    pos (n,) int64; k_cache/v_cache (B >= n, n_kv, S, hd) written in place. Returns q (n, n_heads, hd)."""
    if not use_triton(qkv):
        return rope_cache_ref(qkv, cos, sin, pos, k_cache, v_cache, n_heads=n_heads, n_kv=n_kv, q_norm=q_norm,
                              k_norm=k_norm, eps=eps)
    n, width = qkv.shape
    hd = k_cache.shape[-1]
    if width != (n_heads + 2 * n_kv) * hd or k_cache.shape[1] != n_kv or k_cache.shape[0] < n \
            or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1 or hd % 2:
        raise ValueError(f"rope_cache: qkv {tuple(qkv.shape)} and caches {tuple(k_cache.shape)} do not fit "
                         f"{n_heads} q heads and {n_kv} kv heads. Fix: pass the fused projection and its caches")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rope_cache: pass both q_norm and k_norm or neither")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((n, n_heads, hd), device=qkv.device, dtype=qkv.dtype)
    if n == 0:
        return q
    launchable(_rope_cache_kernel)[(n, n_heads + 2 * n_kv)](
        qkv, cos, sin, pos, q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos, q,
        k_cache, v_cache, n_heads, n_kv, hd, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(eps), HAS_NORM=q_norm is not None, BLOCK_HALF=triton.next_power_of_2(hd // 2),
        num_warps=1 if interpreting() or hd <= 128 else 2, **pdl(qkv))
    return q


def rope_cache_ref(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, *,
                   n_heads: int, n_kv: int, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                   eps: float = 1e-6) -> Tensor:
    """Torch reference: the unfused step's rmsnorm_ref, rotary_ref and cache scatters, in qkv's dtype."""
    from .rmsnorm import rmsnorm_ref
    from .rotary import rotary_ref

    n = qkv.shape[0]
    hd = k_cache.shape[-1]
    q = qkv[:, :n_heads * hd].reshape(n, n_heads, hd)
    k = qkv[:, n_heads * hd:(n_heads + n_kv) * hd].reshape(n, n_kv, hd)
    v = qkv[:, (n_heads + n_kv) * hd:].reshape(n, n_kv, hd)
    if q_norm is not None:
        q, k = rmsnorm_ref(q, q_norm, eps), rmsnorm_ref(k, k_norm, eps)
    c, s = cos[pos], sin[pos]
    q, k = rotary_ref(q, c, s), rotary_ref(k, c, s)
    rows = torch.arange(n, device=qkv.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    return q.contiguous()
