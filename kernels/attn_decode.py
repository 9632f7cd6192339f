"""Grouped-query attention for one new token per sequence against a static KV cache.

For sequence b, KV head h and each of its G query heads g (query head h*G + g):

    s[j]   = scale * <q[b, h, g], K[b, h, j]>          for start_b <= j < L_b
    o[b, h, g] = sum_j softmax(s)[j] * V[b, h, j]

L_b = lengths[b] (the cache slots written so far, the new token included); start_b = 0, or
max(0, L_b - window) with a sliding window. One program per (sequence, KV head) streams that head's
keys and values once for all G query heads (no repeat_interleave), with the online softmax of
FlashAttention in fp32. The sequence lengths are read from a tensor, so the launch has the same
shapes at every step (a CUDA graph can replay it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, use_triton
from ._triton import tl, triton

__all__ = ["attn_decode", "attn_decode_ref"]


@triton.jit
def _attn_decode_kernel(
    q_ptr,  # *T [B, KV, G, HD] queries of the new tokens, contiguous
    k_ptr,  # *T [Bc, KV, S, HD] key cache (Bc >= B); strides stride_kb, stride_kh, stride_ks, 1
    v_ptr,  # *T [Bc, KV, S, HD] value cache, same strides as k
    len_ptr,  # *i32|i64 [B] valid cache slots of each sequence (>= 1)
    o_ptr,  # *T [B, KV, G, HD] output, contiguous
    KV,
    G,
    HD,
    stride_kb,
    stride_kh,
    stride_ks,
    scale,
    WINDOW,  # sliding window (keys j > L - 1 - WINDOW); read only when HAS_WINDOW
    HAS_WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= G, power of two
    BLOCK_S: tl.constexpr,  # cache slots per step
    BLOCK_HD: tl.constexpr,  # >= HD, power of two
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_HD)
    gm = gs < G
    dm = ds < HD
    q_off = ((b * KV + h) * G + gs[:, None]) * HD + ds[None, :]
    q = tl.load(q_ptr + q_off, mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32) * scale

    length = tl.load(len_ptr + b).to(tl.int32)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(length - WINDOW, 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_HD), tl.float32)
    kv_base = b * stride_kb + h * stride_kh
    for s0 in range(start, length, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sm = ss < length
        kv_off = kv_base + ss[:, None].to(tl.int64) * stride_ks + ds[None, :]
        kvm = sm[:, None] & dm[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvm, other=0.0).to(tl.float32)  # (S, HD)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, S)
        s = tl.where(sm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kvm, other=0.0).to(tl.float32)  # (S, HD)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])


def _attn_decode_block_s(hd: int, g: int) -> int:
    """Cache slots per step: keep the (G, S, HD) fp32 product at <= 16K values (64 KiB of
    registers over 4 warps) on the GPU, an untuned first choice (no GPU when written); 64 in the
    interpreter so that short test caches still take several steps of the online softmax."""
    if interpreting():
        return 16
    block_hd = triton.next_power_of_2(hd)
    block_g = triton.next_power_of_2(g)
    return max(16, min(128, 16384 // (block_hd * block_g)))


def attn_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, *, scale: float | None = None,
                window: int | None = None) -> Tensor:
    """Attention of one query token per sequence over its cached keys/values.

    q: (B, KV, G, hd), the G query heads of each KV head together. k_cache, v_cache: (Bc, KV, S, hd)
    with Bc >= B and unit last stride. lengths: (B,) integer tensor, valid slots per sequence (>= 1).
    Returns (B, KV, G, hd) in q's dtype.
    """
    if not use_triton(q):
        return attn_decode_ref(q, k_cache, v_cache, lengths, scale=scale, window=window)
    b, kv, g, hd = q.shape
    if k_cache.dim() != 4 or k_cache.shape[1] != kv or k_cache.shape[3] != hd or k_cache.shape[0] < b \
            or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"attn_decode: caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q "
                         f"{tuple(q.shape)}. Fix: pass (Bc>=B, KV, S, hd) caches with the same layout")
    if k_cache.stride(-1) != 1:
        raise ValueError("attn_decode: the cache needs a unit last stride. Fix: allocate it contiguous")
    if lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attn_decode: lengths must be an int tensor of shape ({b},). Fix: pass the valid "
                         "cache slots of each sequence")
    q = q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    sc = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    launchable(_attn_decode_kernel)[(b, kv)](
        q, k_cache, v_cache, lengths, out, kv, g, hd, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        sc, int(window or 0), HAS_WINDOW=window is not None, BLOCK_G=triton.next_power_of_2(g),
        BLOCK_S=_attn_decode_block_s(hd, g), BLOCK_HD=triton.next_power_of_2(hd),
        num_warps=1 if interpreting() else 4)
    return out


def attn_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, *, scale: float | None = None,
                    window: int | None = None) -> Tensor:
    """Torch reference: masked softmax over each sequence's valid slots, fp32 (fp64 for fp64 input)."""
    b, kv, g, hd = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_max = k_cache.shape[2]
    k, v = k_cache[:b].to(dt), v_cache[:b].to(dt)  # (B, KV, S, hd)
    sc = 1.0 / math.sqrt(hd) if scale is None else scale
    scores = torch.matmul(q.to(dt), k.transpose(-1, -2)) * sc  # (B, KV, G, S)
    j = torch.arange(s_max, device=q.device)[None, :]
    L = lengths.to(q.device).long()[:, None]
    valid = j < L
    if window is not None:
        valid = valid & (j >= L - window)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
