"""Grouped-query attention for one new token per sequence against a static KV cache.

For sequence b, KV head h and each of its G query heads g (query head h*G + g):

    s[j]   = scale * <q[b, h, g], K[b, h, j]>          for start_b <= j < L_b
    o[b, h, g] = sum_j softmax(s)[j] * V[b, h, j]

L_b = lengths[b] (the cache slots written so far, the new token included); start_b = 0, or
max(0, L_b - window) with a sliding window. One program per (sequence, KV head) streams that head's
keys and values once for all G query heads (no repeat_interleave), with the online softmax of
FlashAttention in fp32. The sequence lengths are read from a tensor, so the launch has the same
shapes at every step (a CUDA graph can replay it).

Split-K (flash-decoding): when rows x KV heads give too few programs to fill the GPU (batch 1 has one
per KV head), each (row, head) is split over ``splits`` equal ranges of the cache's slots; every split
writes its partial output and log-sum-exp, and a second launch merges them:
o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M). Splits beyond a row's length write an empty part.
The split count depends on the cache size, not the current length (heuristics.attn_decode_splits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import interpreting, launchable, num_sms, pdl, use_triton
from ._triton import gdc_launch_dependents, gdc_wait, tl, triton
from .heuristics import attn_decode_splits

__all__ = ["attn_decode", "attn_decode_ref", "attn_decode_sdpa", "planned_splits"]


@triton.jit
def _query(q_ptr, len_ptr, b, h, KV, G, HD, scale, WINDOW, HAS_WINDOW: tl.constexpr, BLOCK_G: tl.constexpr,
           BLOCK_HD: tl.constexpr):
    """Row b, KV head h: the (pre-scaled, fp32) queries of its G heads, their offsets and masks, and the
    cache range [start, length) its new token attends to."""
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_HD)
    gm = gs < G
    dm = ds < HD
    q_off = ((b * KV + h) * G + gs[:, None]) * HD + ds[None, :]
    q = tl.load(q_ptr + q_off, mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32) * scale
    length = tl.load(len_ptr + b).to(tl.int32)
    start = length * 0  # a tensor either way: the helper returns one type
    if HAS_WINDOW:
        start = tl.maximum(length - WINDOW, 0)
    return gs, ds, gm, dm, q_off, q, start, length


@triton.jit
def _attend(q, k_ptr, v_ptr, kv_base, lo, hi, stride_ks, ds, dm,
            BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HD: tl.constexpr, KV_EARLY: tl.constexpr = False,
            USE_DOT: tl.constexpr = False):
    """Online softmax of the (pre-scaled) queries q (BLOCK_G, BLOCK_HD) over cache slots [lo, hi) of one
    (row, KV head): returns the running max, the running sum and the unnormalised output, in fp32.

    Two variants the kernels part sweeps, off until a GPU run picks one (run 3: this loop streams the cache
    at 50% of the bandwidth at 64 rows against 82% for SDPA, and Triton's pipelining depth had no effect):
    KV_EARLY issues a step's value load together with its key load (two tiles in flight a program, not one);
    USE_DOT computes both products on the tensor cores, the queries padded to BLOCK_G >= 16 rows and the
    weights rounded to the cache's dtype as FlashAttention does (no cross-thread reductions over the head
    dimension, and loads that feed a dot are the ones Triton's pipeliner overlaps)."""
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_HD), tl.float32)
    qd = q.to(k_ptr.dtype.element_ty)
    for s0 in range(lo, hi, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sm = ss < hi
        kv_off = kv_base + ss[:, None].to(tl.int64) * stride_ks + ds[None, :]
        kvm = sm[:, None] & dm[None, :]
        if USE_DOT:
            kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)  # (S, HD) in the cache's dtype
            vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
            s = tl.dot(qd, tl.trans(kt))  # (G, S) fp32
        else:
            k = tl.load(k_ptr + kv_off, mask=kvm, other=0.0).to(tl.float32)  # (S, HD)
            if KV_EARLY:
                v = tl.load(v_ptr + kv_off, mask=kvm, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, S)
        s = tl.where(sm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            if not KV_EARLY:
                v = tl.load(v_ptr + kv_off, mask=kvm, other=0.0).to(tl.float32)  # (S, HD)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    return m_i, l_i, acc


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
    KV_EARLY: tl.constexpr,  # see _attend
    USE_DOT: tl.constexpr,  # see _attend
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    gs, ds, gm, dm, q_off, q, start, length = _query(q_ptr, len_ptr, b, h, KV, G, HD, scale, WINDOW, HAS_WINDOW,
                                                     BLOCK_G, BLOCK_HD)
    m_i, l_i, acc = _attend(q, k_ptr, v_ptr, b * stride_kb + h * stride_kh, start, length, stride_ks, ds, dm,
                            BLOCK_G, BLOCK_S, BLOCK_HD, KV_EARLY, USE_DOT)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])


@triton.jit
def _attn_split_kernel(
    q_ptr,  # *T [B, KV, G, HD] queries, contiguous
    k_ptr,  # *T [Bc, KV, S, HD] key cache; strides stride_kb, stride_kh, stride_ks, 1
    v_ptr,  # *T [Bc, KV, S, HD] value cache, same strides
    len_ptr,  # *i32|i64 [B] valid cache slots of each sequence (>= 1)
    po_ptr,  # *f32 [B, KV, SPLITS, G, HD] out: each split's normalised partial output
    pl_ptr,  # *f32 [B, KV, SPLITS, G] out: each split's log-sum-exp (-inf where it saw no key)
    KV,
    G,
    HD,
    stride_kb,
    stride_kh,
    stride_ks,
    scale,
    WINDOW,
    SPLIT_LEN,  # cache slots per split
    SPLITS,
    HAS_WINDOW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    KV_EARLY: tl.constexpr,
    USE_DOT: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    gs, ds, gm, dm, q_off, q, start, length = _query(q_ptr, len_ptr, b, h, KV, G, HD, scale, WINDOW, HAS_WINDOW,
                                                     BLOCK_G, BLOCK_HD)
    lo = tl.maximum(start, sp * SPLIT_LEN)
    hi = tl.minimum(length, (sp + 1) * SPLIT_LEN)
    m_i, l_i, acc = _attend(q, k_ptr, v_ptr, b * stride_kb + h * stride_kh, lo, hi, stride_ks, ds, dm,
                            BLOCK_G, BLOCK_S, BLOCK_HD, KV_EARLY, USE_DOT)
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    base = (b * KV + h) * SPLITS + sp
    tl.store(po_ptr + (base * G + gs[:, None]) * HD + ds[None, :], o, mask=gm[:, None] & dm[None, :])
    tl.store(pl_ptr + base * G + gs, lse, mask=gm)


@triton.jit
def _attn_combine_kernel(
    po_ptr,  # *f32 [B, KV, SPLITS, G, HD] partial outputs
    pl_ptr,  # *f32 [B, KV, SPLITS, G] partial log-sum-exps
    o_ptr,  # *T [B, KV, G, HD] out, contiguous
    G,
    HD,
    SPLITS,
    BLOCK_SP: tl.constexpr,  # >= SPLITS, power of two
    BLOCK_HD: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    """Program (b*KV + h, g) merges the splits of query head g of KV head h of row b."""
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    sps = tl.arange(0, BLOCK_SP)
    ds = tl.arange(0, BLOCK_HD)
    spm = sps < SPLITS
    dm = ds < HD
    lse = tl.load(pl_ptr + (bh * SPLITS + sps) * G + g, mask=spm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.exp(lse - mx)
    w = tl.where(spm, w, 0.0)
    po = tl.load(po_ptr + ((bh * SPLITS + sps[:, None]) * G + g) * HD + ds[None, :], mask=spm[:, None] & dm[None, :],
                 other=0.0)
    o = tl.sum(po * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + (bh * G + g) * HD + ds, o.to(o_ptr.dtype.element_ty), mask=dm)


def _attn_decode_block_s(hd: int, g: int) -> int:
    """Cache slots per loop step: keep each (S, HD) tile at <= 4K values (32 fp32 registers a thread over 4
    warps, for K, V and the (G, S, HD) product alike) so nothing spills; a first choice, compared against a
    single pass and SDPA by bench/gpu_suite.py's kernels part. 16 in the interpreter, so that short test
    caches still take several steps of the online softmax."""
    if interpreting():
        return 16
    return max(16, min(64, 4096 // (triton.next_power_of_2(hd) * triton.next_power_of_2(g))))


def planned_splits(rows: int, kv: int, g: int, hd: int, s_max: int, device: torch.device) -> int:
    """The key-range splits :func:`attn_decode` plans by default for this launch (1 in the interpreter):
    whether a single-pass variant differs from the default, for the runtime's pick of the attention."""
    if interpreting():
        return 1
    return attn_decode_splits(rows, kv, s_max, num_sms(device), _attn_decode_block_s(hd, g))


def attn_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, *, scale: float | None = None,
                window: int | None = None, splits: int | None = None, block_s: int | None = None,
                warps: int | None = None, stages: int | None = None, kv_early: bool = False,
                dot: bool = False) -> Tensor:
    """Attention of one query token per sequence over its cached keys/values.

    q: (B, KV, G, hd), the G query heads of each KV head together. k_cache, v_cache: (Bc, KV, S, hd)
    with Bc >= B and unit last stride. lengths: (B,) integer tensor, valid slots per sequence (>= 1).
    splits: key-range splits per (row, head) (None: heuristics.attn_decode_splits; 1: one pass).
    block_s / warps: cache slots per loop step and warps per program (None: the defaults below). stages:
    Triton's software-pipelining depth of the slot loop (None: Triton's default; swept by gpu_suite's
    kernels part; run 3 measured no effect). kv_early: load each step's values with its keys;
    dot: the products on the tensor cores (both variants: _attend; a 16-bit cache and hd >= 16 for dot).
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
    block_s = block_s or _attn_decode_block_s(hd, g)
    warps = 1 if interpreting() else (warps or 4)
    pipe = {"num_stages": stages} if stages and not interpreting() else {}
    s_max = k_cache.shape[2]
    dot = dot and hd >= 16 and block_s >= 16  # tl.dot's smallest tile
    bg = max(16, triton.next_power_of_2(g)) if dot else triton.next_power_of_2(g)
    if splits is None:
        splits = 1 if interpreting() else attn_decode_splits(b, kv, s_max, num_sms(q.device), block_s)
    if splits > 1:
        split_len = -(-triton.cdiv(s_max, splits) // block_s) * block_s  # whole tiles per split
        splits = triton.cdiv(s_max, split_len)
        po = torch.empty((b, kv, splits, g, hd), device=q.device, dtype=torch.float32)
        pl = torch.empty((b, kv, splits, g), device=q.device, dtype=torch.float32)
        launchable(_attn_split_kernel)[(b, kv, splits)](
            q, k_cache, v_cache, lengths, po, pl, kv, g, hd, k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), sc, int(window or 0), split_len, splits, HAS_WINDOW=window is not None,
            BLOCK_G=bg, BLOCK_S=block_s, BLOCK_HD=triton.next_power_of_2(hd), KV_EARLY=kv_early, USE_DOT=dot,
            num_warps=warps, **pipe, **pdl(q))
        launchable(_attn_combine_kernel)[(b * kv, g)](
            po, pl, out, g, hd, splits, BLOCK_SP=triton.next_power_of_2(splits),
            BLOCK_HD=triton.next_power_of_2(hd), num_warps=1 if interpreting() else 2, **pdl(q))
        return out
    launchable(_attn_decode_kernel)[(b, kv)](
        q, k_cache, v_cache, lengths, out, kv, g, hd, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        sc, int(window or 0), HAS_WINDOW=window is not None, BLOCK_G=bg, BLOCK_S=block_s,
        BLOCK_HD=triton.next_power_of_2(hd), KV_EARLY=kv_early, USE_DOT=dot, num_warps=warps, **pipe,
        **pdl(q))
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


def attn_decode_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, *, scale: float | None = None,
                     window: int | None = None) -> Tensor:
    """The same attention through torch's scaled_dot_product_attention over the whole static cache, with a
    per-row length mask built from ``lengths`` on the device (static shapes: capturable in a CUDA graph).

    It reads every slot of the cache, used or not, where :func:`attn_decode` reads each row's valid ones; it
    is the alternative ``LAYERFOLD_DECODE_ATTN=sdpa`` selects in the fused decode step, so that gpu_suite's
    ``decode-sdpa`` part measures both end to end (the kernels part measured torch's SDPA over a full cache
    at 81% of the bandwidth against 49% for this module's kernel at 64 rows, run 2). The G query heads of
    a KV head are its G query positions, so no K/V head is repeated. Its unused slots must hold finite
    values (a masked weight of 0 times a NaN is NaN): the Runtime zeroes a failed sequence's row
    (``Runtime.reset(rows, scrub=True)``, as the server and ``generate`` do), as its torch path needs too.
    It stays an experiment until a GPU run decides.
    """
    b, kv, g, hd = q.shape
    s_max = k_cache.shape[2]
    j = torch.arange(s_max, device=q.device)[None, :]
    L = lengths.to(q.device).long()[:, None]
    valid = j < L
    if window is not None:
        valid = valid & (j >= L - window)
    return F.scaled_dot_product_attention(q, k_cache[:b], v_cache[:b], attn_mask=valid[:, None, None, :],
                                          scale=scale)
