"""Per-channel activation magnitudes: sum |a_c| and sum a_c^2 over valid tokens.

CoMe channel sensitivity and width pruning (METHODS.md): FFN channel c uses a = silu(gate) * up
(the down_proj input; :func:`swiglu_channel_stats` forms it in registers, never in memory);
attention heads use the o_proj input, C = n_heads * head_dim (callers reshape to heads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import heuristics
from ._dispatch import interpreting, launchable, num_sms, use_triton
from ._inputs import check_acc, check_kernel_dtype, compute_dtype, flatten_tokens, new_acc
from ._triton import tl, triton

__all__ = [
    "channel_stats",
    "channel_stats_ref",
    "swiglu_channel_stats",
    "swiglu_channel_stats_ref",
]

ChannelAcc = tuple[Tensor, Tensor]


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # *T [N, C] activations (the gate projection when SWIGLU); unit channel stride
    up_ptr,  # *T [N, C] up projection; read only when SWIGLU
    mask_ptr,  # *i8 [N] nonzero = valid token; read only when HAS_MASK
    abs_ptr,  # *f32 [S, C] out: per-split sums of |a|
    sq_ptr,  # *f32 [S, C] out: per-split sums of a^2
    N,
    C,
    stride_xn,
    stride_un,
    TOKENS_PER_SPLIT,  # tokens each split reduces over; a multiple of BLOCK_N
    SWIGLU: tl.constexpr,  # a = silu(x) * up instead of a = x
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """abs[s, c] = sum_{t in split s, valid} |a_tc|;  sq[s, c] = sum_{t in split s, valid} a_tc^2,
    with a = x, or a = silu(g) * u = g * sigmoid(g) * u (SWIGLU), computed in fp32.

    Program (pc, ps) reduces channels block pc over the tokens of split ps in BLOCK_N steps. The
    (BLOCK_N, BLOCK_C) sums accumulate elementwise in registers and are reduced over tokens once at the
    end: no cross-warp reduction inside the loop, whose loads then follow each other back to back.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < C
    abs_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    sq_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    n_start = pid_s * TOKENS_PER_SPLIT
    for n0 in range(n_start, n_start + TOKENS_PER_SPLIT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + offs_n, mask=valid, other=0) != 0)
        rows = offs_n.to(tl.int64)[:, None]
        m2 = valid[:, None] & in_c[None, :]
        a = tl.load(x_ptr + rows * stride_xn + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        if SWIGLU:
            u = tl.load(up_ptr + rows * stride_un + offs_c[None, :], mask=m2, other=0.0)
            a = a * tl.sigmoid(a) * u.to(tl.float32)  # silu(0) * 0 = 0 on masked entries
        abs_acc += tl.abs(a)
        sq_acc += a * a
    out = pid_s.to(tl.int64) * C + offs_c
    tl.store(abs_ptr + out, tl.sum(abs_acc, axis=0), mask=in_c)
    tl.store(sq_ptr + out, tl.sum(sq_acc, axis=0), mask=in_c)


def _channel_blocks(n: int, c: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_C, splits, num_warps).

    GPU: ``heuristics.CHANNEL_STATS`` (tiles, and token splits for about ``programs_per_sm``
    programs per SM). Interpreter: large tiles (fewer numpy ops) and at most two splits, so the CPU
    tests still exercise the partial-sum path.
    """
    if interpreting():
        block_n = min(64, triton.next_power_of_2(max(n, 1)))
        block_c = min(256, triton.next_power_of_2(max(c, 1)))
        return block_n, block_c, min(2, triton.cdiv(n, block_n)), 4
    cfg = heuristics.CHANNEL_STATS
    want = triton.cdiv(cfg.programs_per_sm * num_sms(device), triton.cdiv(c, cfg.block_c))
    return cfg.block_n, cfg.block_c, max(1, min(want, triton.cdiv(n, cfg.block_n))), cfg.warps


def _launch(x: Tensor, up: Tensor | None, mask: Tensor | None, acc: ChannelAcc | None) -> ChannelAcc:
    x2, m = flatten_tokens(x, mask, "gate" if up is not None else "x")
    check_kernel_dtype(x2, "gate" if up is not None else "x")
    u2 = x2
    if up is not None:
        u2, _ = flatten_tokens(up, None, "up")
        check_kernel_dtype(u2, "up")
    n, c = x2.shape
    if acc is None:
        acc = (new_acc((c,), x.device, torch.float32), new_acc((c,), x.device, torch.float32))
    check_acc(acc[0], (c,), x.device, "acc[0] (abs_sum)", triton_path=True)
    check_acc(acc[1], (c,), x.device, "acc[1] (sq_sum)", triton_path=True)
    if n == 0 or c == 0:
        return acc
    block_n, block_c, splits, warps = _channel_blocks(n, c, x.device)
    tokens_per_split = triton.cdiv(triton.cdiv(n, block_n), splits) * block_n
    part = torch.empty((2, splits, c), device=x.device, dtype=torch.float32)
    launchable(_channel_stats_kernel)[(triton.cdiv(c, block_c), splits)](
        x2, u2, m.view(torch.int8) if m is not None else x2, part[0], part[1],
        n, c, x2.stride(0), u2.stride(0), tokens_per_split,
        SWIGLU=up is not None, HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=warps,
    )
    sums = part.sum(1)  # fixed-order sum of the split partials: deterministic, no atomics
    acc[0].add_(sums[0])
    acc[1].add_(sums[1])
    return acc


def _check_pair(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(
            f"gate and up must have the same shape and device; got {list(gate.shape)} on "
            f"{gate.device} and {list(up.shape)} on {up.device}"
        )


def channel_stats(
    x: Tensor, mask: Tensor | None = None, acc: ChannelAcc | None = None
) -> ChannelAcc:
    """(abs_sum, sq_sum) += (sum_t |x_tc|, sum_t x_tc^2) over valid tokens, per channel c.

    x: [N, C] or [B, T, C], fp32/fp16/bf16. mask: token-shaped, bool or 0/1; None = all valid.
    acc: (abs_sum [C], sq_sum [C]) fp32, added into in place and returned (None: zeros).
    """
    if not use_triton(x):
        x2, m = flatten_tokens(x, mask)
        dt = compute_dtype(x2, acc[0] if acc is not None else None)
        return _stats_cpu(x2.to(dt).abs(), m, acc, dt)
    return _launch(x, None, mask, acc)


def swiglu_channel_stats(
    gate: Tensor, up: Tensor, mask: Tensor | None = None, acc: ChannelAcc | None = None
) -> ChannelAcc:
    """:func:`channel_stats` of a = silu(gate) * up, computed in fp32 inside the kernel without
    materialising a. gate, up: [N, C] or [B, T, C], same shape and dtype family."""
    _check_pair(gate, up)
    if not use_triton(gate):
        g2, m = flatten_tokens(gate, mask, "gate")
        u2, _ = flatten_tokens(up, None, "up")
        dt = compute_dtype(g2, acc[0] if acc is not None else None)
        return _stats_cpu(torch.nn.functional.silu(g2.to(dt)).mul_(u2.to(dt)).abs_(), m, acc, dt)
    return _launch(gate, up, mask, acc)


def _stats_cpu(a: Tensor, mask: Tensor | None, acc: ChannelAcc | None, dt: torch.dtype) -> ChannelAcc:
    """The CPU path (no Triton): ``a`` = |activations| [N, C], a buffer of ours to overwrite. Padding rows
    are zeroed in place and the squares taken in place: no boolean-index copies, about half the
    reference's time at SmolLM2's FFN width (bench/bench_kernels.py --cpu)."""
    acc = _torch_acc(acc, a.shape[1], a.device, dt)
    if mask is not None:
        a.masked_fill_(~mask[:, None], 0.0)  # also drops any nan padding holds
    acc[0].add_(a.sum(0))
    acc[1].add_(a.square_().sum(0))
    return acc


def _torch_acc(acc: ChannelAcc | None, c: int, device: torch.device, dt: torch.dtype) -> ChannelAcc:
    """The accumulators of the torch paths: new zeros in ``dt``, or the caller's, checked."""
    if acc is None:
        acc = (new_acc((c,), device, dt), new_acc((c,), device, dt))
    check_acc(acc[0], (c,), device, "acc[0] (abs_sum)", triton_path=False)
    check_acc(acc[1], (c,), device, "acc[1] (sq_sum)", triton_path=False)
    return acc


def _stats_ref(a: Tensor, mask: Tensor | None, acc: ChannelAcc | None, dt: torch.dtype) -> ChannelAcc:
    acc = _torch_acc(acc, a.shape[1], a.device, dt)
    if mask is not None:
        a = a[mask]  # indexing drops padding (and any nan it holds)
    acc[0].add_(a.abs().sum(0))
    acc[1].add_((a * a).sum(0))
    return acc


def channel_stats_ref(
    x: Tensor, mask: Tensor | None = None, acc: ChannelAcc | None = None
) -> ChannelAcc:
    """Torch reference of :func:`channel_stats`, in the accumulators' dtype (fp32 when None;
    fp64 for fp64 input)."""
    x2, m = flatten_tokens(x, mask)
    dt = compute_dtype(x2, acc[0] if acc is not None else None)
    return _stats_ref(x2.to(dt), m, acc, dt)


def swiglu_channel_stats_ref(
    gate: Tensor, up: Tensor, mask: Tensor | None = None, acc: ChannelAcc | None = None
) -> ChannelAcc:
    """Torch reference of :func:`swiglu_channel_stats` (a = silu(gate) * up in the compute dtype)."""
    _check_pair(gate, up)
    g2, m = flatten_tokens(gate, mask, "gate")
    u2, _ = flatten_tokens(up, None, "up")
    dt = compute_dtype(g2, acc[0] if acc is not None else None)
    a = torch.nn.functional.silu(g2.to(dt)) * u2.to(dt)
    return _stats_ref(a, m, acc, dt)
