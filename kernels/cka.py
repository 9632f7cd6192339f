"""Minibatch linear CKA (Nguyen et al. 2021) built from U-centred Grams and unbiased HSIC.

Per batch of m valid tokens, layer a's representation X_a [m, d] gives K_a = X_a X_a^T with its
diagonal zeroed, then U-centred (Szekely & Rizzo):

    r = K 1 (row sums; K is symmetric),  S = 1^T K 1,
    K~ = K - (1 r^T + r 1^T) / (m - 2) + S / ((m - 1)(m - 2)) 1 1^T,  diag(K~) = 0.

The unbiased HSIC is HSIC(K_a, K_b) = <K~_a, K~_b>_F / (m (m - 3)); CKA = H_ab / sqrt(H_aa H_bb).

Normalisation choice: the 1/(m(m-3)) factor cancels in CKA for one batch but not in a sum over
batches of different m. :func:`hsic_accumulate` and :func:`hsic_row_accumulate` divide each
batch's inner products by m(m-3) before adding, so every batch contributes an HSIC *estimate*
(batches weighted equally, whatever their token count). All in floating point: never truncated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, num_sms, use_triton
from ._inputs import check_acc, check_kernel_dtype, compute_dtype, flatten_tokens, new_acc
from ._triton import tl, triton

__all__ = [
    "cka_from_hsic",
    "hsic_accumulate",
    "hsic_accumulate_ref",
    "hsic_row_accumulate",
    "hsic_row_accumulate_ref",
    "hsic_rows",
    "ucentered_gram",
    "ucentered_gram_ref",
    "ucentered_grams",
]

MIN_TOKENS = 4  # the unbiased estimator divides by m - 3
# On CUDA the HSIC products run as torch (cuBLAS) matrix products: on an H200 at the 7B shapes they took
# 0.036 / 0.016 ms against 0.096 / 0.051 ms for the Triton kernels (hsic_accumulate / hsic_row_accumulate,
# bench/gpu_suite.py kernels part, docs/PERFORMANCE.md). The Triton kernels stay for the interpreter tests.
HSIC_ON_CUDA = "torch"


@triton.jit
def _ucentered_gram_kernel(
    x_ptr,  # *T [M, D] valid tokens; row stride stride_xm, unit channel stride
    k_ptr,  # *f32 [M, M] out: K = X X^T with zero diagonal
    rpart_ptr,  # *f32 [n_col_blocks, M] out: rpart[pj, i] = sum_{j in block pj} K_ij
    M,
    D,
    stride_xm,
    CAST_F32: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter: bf16 dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """K_ij = (i != j) * sum_c x_ic x_jc for block (pi, pj), channels streamed in BLOCK_D chunks
    (tl.dot, fp32 accumulation, ieee precision), plus the block's row sums for the centring."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    in_i = offs_i < M
    in_j = offs_j < M
    rows_i = x_ptr + offs_i.to(tl.int64)[:, None] * stride_xm
    rows_j = x_ptr + offs_j.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        xi = tl.load(rows_i + offs_d[None, :], mask=in_i[:, None] & in_d[None, :], other=0.0)
        xj = tl.load(rows_j + offs_d[None, :], mask=in_j[:, None] & in_d[None, :], other=0.0)
        if CAST_F32:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee", out_dtype=tl.float32)
    acc = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, acc)
    m_ij = in_i[:, None] & in_j[None, :]
    tl.store(k_ptr + offs_i.to(tl.int64)[:, None] * M + offs_j[None, :], acc, mask=m_ij)
    tl.store(rpart_ptr + pid_j * M + offs_i, tl.sum(acc, axis=1), mask=in_i)


@triton.jit
def _ucenter_kernel(
    k_ptr,  # *f32 [M, M] in: K with zero diagonal; out (in place): U-centred K~
    r_ptr,  # *f32 [M] row sums r = K 1
    total_ptr,  # *f32 [1] S = sum of all entries of K
    M,
    inv_m2,  # 1 / (m - 2)
    inv_m1m2,  # 1 / ((m - 1)(m - 2))
    BLOCK_M: tl.constexpr,
):
    """K~_ij = (i != j) * (K_ij - (r_i + r_j) / (m - 2) + S / ((m - 1)(m - 2)))."""
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_i = offs_i < M
    in_j = offs_j < M
    m_ij = in_i[:, None] & in_j[None, :]
    ptrs = k_ptr + offs_i.to(tl.int64)[:, None] * M + offs_j[None, :]
    k = tl.load(ptrs, mask=m_ij, other=0.0)
    r_i = tl.load(r_ptr + offs_i, mask=in_i, other=0.0)
    r_j = tl.load(r_ptr + offs_j, mask=in_j, other=0.0)
    total = tl.load(total_ptr)
    kc = k - (r_i[:, None] + r_j[None, :]) * inv_m2 + total * inv_m1m2
    tl.store(ptrs, tl.where(offs_i[:, None] == offs_j[None, :], 0.0, kc), mask=m_ij)


@triton.jit
def _hsic_kernel(
    g_ptr,  # *T [L, M2] flattened U-centred Grams; row stride stride_gl, unit stride within
    part_ptr,  # *f32 [S, L, L] out: per-split partial inner products
    L,
    M2,
    stride_gl,
    ELEMS_PER_SPLIT,  # flattened Gram entries each split reduces over; a multiple of BLOCK_K
    CAST_F32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[s, a, b] = sum_{e in split s} G[a, e] G[b, e]: one tile of the (L x m^2)(m^2 x L)
    product, the reduction dim streamed in BLOCK_K chunks (tl.dot, fp32, ieee precision)."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_a = pid_a * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_b = pid_b * BLOCK_L + tl.arange(0, BLOCK_L)
    in_a = offs_a < L
    in_b = offs_b < L
    rows_a = g_ptr + offs_a.to(tl.int64)[:, None] * stride_gl
    rows_b = g_ptr + offs_b.to(tl.int64)[:, None] * stride_gl
    acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
    e_start = pid_s.to(tl.int64) * ELEMS_PER_SPLIT
    for e0 in range(e_start, e_start + ELEMS_PER_SPLIT, BLOCK_K):
        offs_e = e0 + tl.arange(0, BLOCK_K)
        in_e = offs_e < M2
        ga = tl.load(rows_a + offs_e[None, :], mask=in_a[:, None] & in_e[None, :], other=0.0)
        gb = tl.load(rows_b + offs_e[None, :], mask=in_b[:, None] & in_e[None, :], other=0.0)
        if CAST_F32:
            ga = ga.to(tl.float32)
            gb = gb.to(tl.float32)
        acc = tl.dot(ga, tl.trans(gb), acc, input_precision="ieee", out_dtype=tl.float32)
    out = part_ptr + pid_s.to(tl.int64) * L * L + offs_a[:, None] * L + offs_b[None, :]
    tl.store(out, acc, mask=in_a[:, None] & in_b[None, :])


@triton.jit
def _hsic_row_kernel(
    g_ptr,  # *T [M2] flattened U-centred Gram of the current layer
    gs_ptr,  # *T [L, M2] flattened U-centred Grams of the stored layers; row stride stride_gl
    part_ptr,  # *f32 [n_chunks, L] out: per-chunk partial inner products
    L,
    M2,
    stride_gl,
    BLOCK_K: tl.constexpr,
):
    """part[c, l] = sum_{e in chunk c} g[e] G_l[e]: the current Gram's chunk is loaded once and
    reused against every stored layer (fp32 arithmetic)."""
    pid = tl.program_id(0)
    offs_e = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_e = offs_e < M2
    g = tl.load(g_ptr + offs_e, mask=in_e, other=0.0).to(tl.float32)
    for l in range(0, L):
        gl = tl.load(gs_ptr + l * stride_gl + offs_e, mask=in_e, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid * L + l, tl.sum(g * gl, axis=0))


def _cka_blocks(size: int, reduce: int, lo: int, hi: int) -> tuple[int, int]:
    """(tile, reduction chunk) for the tl.dot kernels: GPU 64 x 64 tiles with 64-wide reduction
    steps (clamped to [lo, hi] for the tile), a standard mma tile, not yet tuned on a GPU (none was
    available when written). Interpreter: the largest tiles that fit (fewer numpy ops)."""
    if interpreting():
        tile = min(hi, max(lo, triton.next_power_of_2(size)))
        return tile, min(256, max(16, triton.next_power_of_2(reduce)))
    return min(hi, max(lo, triton.next_power_of_2(size))), 64


def _valid_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    x2, m = flatten_tokens(x, mask)
    xs = x2 if m is None else x2[m]
    if xs.shape[0] < MIN_TOKENS:
        raise ValueError(
            f"ucentered_gram needs at least {MIN_TOKENS} valid tokens (the unbiased HSIC divides "
            f"by m - 3); got m = {xs.shape[0]}: use batches with more non-padding tokens"
        )
    return xs


def ucentered_gram(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """U-centred Gram K~ [m, m] (fp32) of the m valid tokens of x ([n, d] or [B, T, d]; masked
    tokens are dropped, m >= 4), see the module docstring for the formula."""
    if not use_triton(x):
        return ucentered_gram_ref(x, mask)
    xs = _valid_tokens(x, mask)
    check_kernel_dtype(xs, "x")
    m, d = xs.shape
    block_m, block_d = _cka_blocks(m, d, 16, 64)
    nb = triton.cdiv(m, block_m)
    k = torch.empty((m, m), device=x.device, dtype=torch.float32)
    rpart = torch.empty((nb, m), device=x.device, dtype=torch.float32)
    launchable(_ucentered_gram_kernel)[(nb, nb)](
        xs, k, rpart, m, d, xs.stride(0),
        CAST_F32=interpreting(), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    r = rpart.sum(0)
    launchable(_ucenter_kernel)[(nb, nb)](
        k, r, r.sum().reshape(1), m, 1.0 / (m - 2), 1.0 / ((m - 1) * (m - 2)),
        BLOCK_M=block_m, num_warps=4,
    )
    return k


def ucentered_gram_ref(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Torch reference of :func:`ucentered_gram`, in fp32 (fp64 for fp64 input)."""
    xs = _valid_tokens(x, mask)
    xs = xs.to(compute_dtype(xs, None))
    m = xs.shape[0]
    k = xs @ xs.T
    k.fill_diagonal_(0)
    r = k.sum(1)
    kc = k - (r[:, None] + r[None, :]) / (m - 2) + r.sum() / ((m - 1) * (m - 2))
    return kc.fill_diagonal_(0)


def _check_grams(grams: Tensor, name: str) -> tuple[int, int]:
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"{name} must be [L, m, m] (stacked ucentered_gram outputs); got {list(grams.shape)}")
    m = grams.shape[1]
    if m < MIN_TOKENS:
        raise ValueError(f"{name} are {m} x {m}; the unbiased HSIC needs m >= {MIN_TOKENS} tokens")
    return grams.shape[0], m


def _hsic_scale(m: int) -> float:
    return 1.0 / (m * (m - 3))  # float division: never truncated


def _flat(grams: Tensor) -> Tensor:
    flat = grams.reshape(grams.shape[0], grams.shape[1] * grams.shape[2])  # a view if contiguous
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def hsic_accumulate(grams: Tensor, acc: Tensor | None = None) -> Tensor:
    """acc[a, b] += <K~_a, K~_b>_F / (m (m - 3)) for all layer pairs of one batch.

    grams: [L, m, m] U-centred Grams (from :func:`ucentered_gram`). acc: [L, L] fp32, added into in
    place and returned (None: zeros).
    """
    if not use_triton(grams) or grams.is_cuda:  # CUDA: the library product reads the Grams faster (HSIC_ON_CUDA)
        return hsic_accumulate_ref(grams, acc)
    n_layers, m = _check_grams(grams, "grams")
    check_kernel_dtype(grams, "grams")
    if acc is None:
        acc = new_acc((n_layers, n_layers), grams.device, torch.float32)
    check_acc(acc, (n_layers, n_layers), grams.device, "acc", triton_path=True)
    if n_layers == 0:
        return acc
    flat = _flat(grams)
    m2 = m * m
    block_l, block_k = _cka_blocks(n_layers, m2, 16, 32 if not interpreting() else 64)
    tiles = triton.cdiv(n_layers, block_l)
    k_blocks = triton.cdiv(m2, block_k)
    if grams.is_cuda:  # about two waves of programs over the SMs
        splits = max(1, min(k_blocks, triton.cdiv(2 * num_sms(grams.device), tiles * tiles)))
    else:
        splits = min(2, k_blocks)
    elems = triton.cdiv(k_blocks, splits) * block_k
    part = torch.empty((splits, n_layers, n_layers), device=grams.device, dtype=torch.float32)
    launchable(_hsic_kernel)[(tiles, tiles, splits)](
        flat, part, n_layers, m2, flat.stride(0), elems,
        CAST_F32=interpreting(), BLOCK_L=block_l, BLOCK_K=block_k, num_warps=4,
    )
    return acc.add_(part.sum(0), alpha=_hsic_scale(m))


def hsic_accumulate_ref(grams: Tensor, acc: Tensor | None = None) -> Tensor:
    """Torch reference of :func:`hsic_accumulate`, in the accumulator's dtype (fp32 when None;
    fp64 for fp64 input)."""
    n_layers, m = _check_grams(grams, "grams")
    dt = compute_dtype(grams, acc)
    if acc is None:
        acc = new_acc((n_layers, n_layers), grams.device, dt)
    check_acc(acc, (n_layers, n_layers), grams.device, "acc", triton_path=False)
    flat = grams.reshape(n_layers, m * m).to(dt)
    return acc.add_(flat @ flat.T, alpha=_hsic_scale(m))


def _check_row(gram: Tensor, grams: Tensor) -> tuple[int, int]:
    n_layers, m = _check_grams(grams, "grams")
    if tuple(gram.shape) != (m, m) or gram.device != grams.device:
        raise ValueError(
            f"gram must be [{m}, {m}] on {grams.device} like each of grams; "
            f"got {list(gram.shape)} on {gram.device}"
        )
    return n_layers, m


def hsic_row_accumulate(gram: Tensor, grams: Tensor, acc_row: Tensor | None = None) -> Tensor:
    """acc_row[l] += <K~, K~_l>_F / (m (m - 3)): the current layer's U-centred Gram against the L
    stored ones of the same batch (layer-by-layer calibration order). gram: [m, m];
    grams: [L, m, m] (L may be 0); acc_row: [L] fp32, added into in place and returned."""
    if not use_triton(gram) or gram.is_cuda:  # CUDA: the library product (HSIC_ON_CUDA)
        return hsic_row_accumulate_ref(gram, grams, acc_row)
    n_layers, m = _check_row(gram, grams)
    check_kernel_dtype(gram, "gram")
    check_kernel_dtype(grams, "grams")
    if acc_row is None:
        acc_row = new_acc((n_layers,), gram.device, torch.float32)
    check_acc(acc_row, (n_layers,), gram.device, "acc_row", triton_path=True)
    if n_layers == 0:
        return acc_row
    g = gram.reshape(-1).contiguous()
    flat = _flat(grams)
    m2 = m * m
    # 2048-entry chunks (8 KiB fp32 a row read): bandwidth-bound, not yet tuned on a GPU.
    block_k = min(2048, triton.next_power_of_2(m2)) if not interpreting() else min(4096, triton.next_power_of_2(m2))
    chunks = triton.cdiv(m2, block_k)
    part = torch.empty((chunks, n_layers), device=gram.device, dtype=torch.float32)
    launchable(_hsic_row_kernel)[(chunks,)](
        g, flat, part, n_layers, m2, flat.stride(0), BLOCK_K=block_k, num_warps=4,
    )
    return acc_row.add_(part.sum(0), alpha=_hsic_scale(m))


def hsic_row_accumulate_ref(gram: Tensor, grams: Tensor, acc_row: Tensor | None = None) -> Tensor:
    """Torch reference of :func:`hsic_row_accumulate`, in the accumulator's dtype (fp32 when
    None; fp64 for fp64 input)."""
    n_layers, m = _check_row(gram, grams)
    dt = compute_dtype(gram, acc_row)
    if acc_row is None:
        acc_row = new_acc((n_layers,), gram.device, dt)
    check_acc(acc_row, (n_layers,), gram.device, "acc_row", triton_path=False)
    flat = grams.reshape(n_layers, m * m).to(dt)
    return acc_row.add_(flat @ gram.reshape(-1).to(dt), alpha=_hsic_scale(m))


def ucentered_grams(x: Tensor) -> Tensor:
    """U-centred Grams of S minibatches at once: x [S, m, d] (every token valid) -> [S, m, m] fp32.

    The interpreter (tests): :func:`ucentered_gram` per minibatch. CPU and CUDA: the same arithmetic
    batched over S in a few library calls (one batched matrix product): per-minibatch launches are
    dozens of small ops each, and on an H200 the torch HSIC products beat the Triton ones at these
    sizes (bench/gpu_suite.py kernels part, docs/PERFORMANCE.md)."""
    if x.dim() != 3 or x.shape[1] < MIN_TOKENS:
        raise ValueError(f"x must be [S, m, d] with m >= {MIN_TOKENS}; got {list(x.shape)}")
    if use_triton(x) and not x.is_cuda:
        return torch.stack([ucentered_gram(xs) for xs in x])
    xs = x.to(compute_dtype(x, None))
    m = xs.shape[1]
    k = xs @ xs.transpose(1, 2)  # (S, m, m)
    k.diagonal(dim1=1, dim2=2).zero_()
    r = k.sum(2)
    k -= (r[:, :, None] + r[:, None, :]) / (m - 2)
    k += (r.sum(1) / ((m - 1) * (m - 2)))[:, None, None]
    k.diagonal(dim1=1, dim2=2).zero_()
    return k


def hsic_rows(gram: Tensor, grams: Tensor) -> Tensor:
    """sum over minibatches s of <K~_s, K~_{s,l}>_F / (m (m - 3)): gram [S, m, m] (the current layer),
    grams [S, L, m, m] (stored layers of the same minibatches) -> [L] fp64. The interpreter (tests):
    :func:`hsic_row_accumulate` per minibatch; CPU and CUDA: one batched matrix-vector product (see
    :func:`ucentered_grams`)."""
    if gram.dim() != 3 or grams.dim() != 4 or grams.shape[0] != gram.shape[0] or grams.shape[2:] != gram.shape[1:]:
        raise ValueError(f"gram must be [S, m, m] and grams [S, L, m, m]; got {list(gram.shape)}, "
                         f"{list(grams.shape)}")
    S, L, m = grams.shape[0], grams.shape[1], gram.shape[1]
    if use_triton(gram) and not gram.is_cuda:
        out = torch.zeros(L, dtype=torch.float64, device=gram.device)
        for s in range(S):
            out += hsic_row_accumulate(gram[s], grams[s]).double()
        return out
    dt = compute_dtype(gram, None)
    prev = grams.reshape(S, L, m * m).to(dt)
    return torch.bmm(prev, gram.reshape(S, m * m, 1).to(dt)).sum(0).squeeze(-1).double() * _hsic_scale(m)


def cka_from_hsic(hsic: Tensor) -> Tensor:
    """CKA_ab = H_ab / sqrt(H_aa H_bb), in fp64. Each diagonal entry is clamped to the smallest
    positive fp64 before the square root, so a layer with H_aa = 0 (a constant representation)
    gives finite values (0 where H_ab is 0) instead of nan."""
    if hsic.dim() != 2 or hsic.shape[0] != hsic.shape[1]:
        raise ValueError(f"hsic must be a square [L, L] matrix; got {list(hsic.shape)}")
    h = hsic.to(torch.float64)
    root = torch.sqrt(torch.diagonal(h).clamp_min(torch.finfo(torch.float64).tiny))
    return h / (root[:, None] * root[None, :])
