"""Streaming Gram matrix and per-channel moments of token activations.

Used for SliceGPT / Dynamic Slicing PCA (METHODS.md): G = X^T X accumulated in fp32 over the
calibration stream, eigendecomposed later in fp64 by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import interpreting, launchable, num_sms, use_triton
from ._inputs import check_acc, check_kernel_dtype, compute_dtype, flatten_tokens, new_acc
from ._triton import tl, triton

__all__ = ["gram_accumulate", "gram_accumulate_ref"]

GramAcc = tuple[Tensor, Tensor, Tensor]


@triton.jit
def _gram_kernel(
    x_ptr,  # *T [N, D] token activations; row stride stride_xn, unit channel stride
    mask_ptr,  # *i8 [N] nonzero = valid token; read only when HAS_MASK
    g_ptr,  # *f32 [S, D, D] Gram accumulator(s): token split s adds into g_ptr + s*D*D
    s_ptr,  # *f32 [S, D] per-channel sum accumulator(s)
    ss_ptr,  # *f32 [S, D] per-channel sum-of-squares accumulator(s)
    N,
    D,
    stride_xn,
    TOKENS_PER_SPLIT,  # tokens each split reduces over; a multiple of BLOCK_N
    HAS_MASK: tl.constexpr,
    CAST_F32: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter: bf16 dot is wrong)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """G[i, j] += sum_t m_t x_t[i] x_t[j];  s[i] += sum_t m_t x_t[i];  ss[i] += sum_t m_t x_t[i]^2.

    Program (pi, pj, ps) owns output block (pi, pj) of the upper triangle (pi <= pj) and its mirror
    (pj, pi), and reduces over the tokens of split ps in BLOCK_N steps with tl.dot (fp32
    accumulation; fp32 operands at ieee precision, never tf32). Diagonal programs (pi == pj) also
    reduce the per-channel sums of their channel block. Every output element has one owner, so the
    read-add-write into the accumulators needs no atomics.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_i > pid_j:
        return  # lower-triangle blocks are written as mirrors by the upper-triangle program
    offs_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = offs_i < D
    in_j = offs_j < D
    diag = pid_i == pid_j

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ss_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_start = pid_s * TOKENS_PER_SPLIT
    for n0 in range(n_start, n_start + TOKENS_PER_SPLIT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + offs_n, mask=valid, other=0) != 0)
        rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
        # Masked loads read 0 for padding: garbage (even inf/nan) in padded rows never enters.
        xi = tl.load(rows + offs_i[None, :], mask=valid[:, None] & in_i[None, :], other=0.0)
        xj = tl.load(rows + offs_j[None, :], mask=valid[:, None] & in_j[None, :], other=0.0)
        if CAST_F32:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        # fp16/bf16 products are exact in fp32, so native-dtype tensor-core dots lose nothing.
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision="ieee", out_dtype=tl.float32)
        if diag:
            xf = xi.to(tl.float32)
            s_acc += tl.sum(xf, axis=0)
            ss_acc += tl.sum(xf * xf, axis=0)

    g_base = g_ptr + pid_s.to(tl.int64) * D * D
    ij = g_base + offs_i[:, None] * D + offs_j[None, :]
    m_ij = in_i[:, None] & in_j[None, :]
    tl.store(ij, tl.load(ij, mask=m_ij, other=0.0) + acc, mask=m_ij)
    if diag:
        v_base = pid_s.to(tl.int64) * D
        tl.store(s_ptr + v_base + offs_i, tl.load(s_ptr + v_base + offs_i, mask=in_i) + s_acc,
                 mask=in_i)
        tl.store(ss_ptr + v_base + offs_i, tl.load(ss_ptr + v_base + offs_i, mask=in_i) + ss_acc,
                 mask=in_i)
    else:
        ji = g_base + offs_j[None, :] * D + offs_i[:, None]  # element (j, i) laid out as acc's (i, j)
        tl.store(ji, tl.load(ji, mask=m_ij, other=0.0) + acc, mask=m_ij)


def _gram_blocks(d: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps).

    GPU: 64x64 output tiles with 64-token steps, 4 warps: the usual tile for an mma-based
    reduction of this size; not yet tuned on a GPU (none was available when written; rerun
    bench/bench_kernels.py to retune). Interpreter: each program op is one numpy call, so the
    largest tiles that fit the problem (>= 16, tl.dot's minimum) run fastest.
    """
    if interpreting():
        return min(64, max(16, triton.next_power_of_2(d))), min(64, max(16, triton.next_power_of_2(n))), 4
    return 64, 64, 4


def _gram_splits(n_tiles: int, n_token_blocks: int, d: int, device: torch.device) -> int:
    """Token splits S: enough programs for about two waves on the GPU when d is small (few output
    tiles), capped so the [S, d, d] fp32 partial Grams stay under 256 MiB. The interpreter uses two
    splits whenever there are two token blocks, so the CPU tests exercise the partial-sum path."""
    if device.type != "cuda":
        return min(2, n_token_blocks)
    want = triton.cdiv(2 * num_sms(device), n_tiles)
    cap = max(1, (256 << 20) // (4 * d * d))
    return max(1, min(want, n_token_blocks, cap))


def gram_accumulate(
    x: Tensor, mask: Tensor | None = None, acc: GramAcc | None = None
) -> GramAcc:
    """Add X^T X, sum_t x_t and sum_t x_t^2 over the valid tokens of ``x`` into ``acc``.

    x: [N, d] or [B, T, d], fp32/fp16/bf16. mask: [N] or [B, T], bool or 0/1; None = all valid.
    acc: (G [d, d], s [d], ss [d]) fp32 on x's device, added into in place and returned;
    None allocates zeros. Returns (G, s, ss).
    """
    if not use_triton(x):
        return gram_accumulate_ref(x, mask, acc)
    x2, m = flatten_tokens(x, mask)
    check_kernel_dtype(x2, "x")
    n, d = x2.shape
    if acc is None:
        acc = (new_acc((d, d), x.device, torch.float32), new_acc((d,), x.device, torch.float32),
               new_acc((d,), x.device, torch.float32))
    for t, shape, name in zip(acc, ((d, d), (d,), (d,)), ("acc[0] (G)", "acc[1] (s)", "acc[2] (ss)"), strict=True):
        check_acc(t, shape, x.device, name, triton_path=True)
    if n == 0 or d == 0:
        return acc

    block_d, block_n, warps = _gram_blocks(d, n)
    tiles_1d = triton.cdiv(d, block_d)
    token_blocks = triton.cdiv(n, block_n)
    splits = _gram_splits(tiles_1d * (tiles_1d + 1) // 2, token_blocks, d, x.device)
    tokens_per_split = triton.cdiv(token_blocks, splits) * block_n
    g, s, ss = acc
    if splits > 1:  # each split writes its own partial; summed below in a fixed order
        g = torch.zeros((splits, d, d), device=x.device, dtype=torch.float32)
        s = torch.zeros((splits, d), device=x.device, dtype=torch.float32)
        ss = torch.zeros((splits, d), device=x.device, dtype=torch.float32)
    mask_arg = m.view(torch.int8) if m is not None else x2  # dummy pointer when HAS_MASK is off
    launchable(_gram_kernel)[(tiles_1d, tiles_1d, splits)](
        x2, mask_arg, g, s, ss, n, d, x2.stride(0), tokens_per_split,
        HAS_MASK=m is not None, CAST_F32=interpreting(), BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=warps,
    )
    if splits > 1:
        acc[0].add_(g.sum(0))
        acc[1].add_(s.sum(0))
        acc[2].add_(ss.sum(0))
    return acc


def gram_accumulate_ref(
    x: Tensor, mask: Tensor | None = None, acc: GramAcc | None = None
) -> GramAcc:
    """Torch reference of :func:`gram_accumulate`, in the accumulators' dtype (fp32 when None;
    fp64 for fp64 input)."""
    x2, m = flatten_tokens(x, mask)
    d = x2.shape[1]
    dt = compute_dtype(x2, acc[0] if acc is not None else None)
    if acc is None:
        acc = (new_acc((d, d), x.device, dt), new_acc((d,), x.device, dt), new_acc((d,), x.device, dt))
    for t, shape, name in zip(acc, ((d, d), (d,), (d,)), ("acc[0] (G)", "acc[1] (s)", "acc[2] (ss)"), strict=True):
        check_acc(t, shape, x.device, name, triton_path=False)
    xs = (x2 if m is None else x2[m]).to(dt)  # indexing drops padding (and any nan it holds)
    acc[0].add_(xs.T @ xs)
    acc[1].add_(xs.sum(0))
    acc[2].add_((xs * xs).sum(0))
    return acc
