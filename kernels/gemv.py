"""Skinny matrix products for decode: a few rows of activations against a large weight matrix.

    y[n, o] = sum_k x[n, k] W[o, k]  (+ bias[o])  (+ res[n, o])

for n <= 8 rows (a decode step of a small batch). Each program owns BLOCK_O output columns and streams
its BLOCK_O rows of W once, BLOCK_K values at a time, for every row of x; products accumulate elementwise
in fp32 registers, reduced along k once at the end. The epilogue adds the bias and the residual (the
decode step's ``h + y @ W^T``) before a single rounding to the output dtype.

Whether this or cuBLAS (``F.linear``) is faster depends on the shape and the card, so the runtime
times both per weight shape when it builds its CUDA graphs (:func:`pick_linear`) and keeps the
faster; the candidate tiles are in ``heuristics.GEMV_CONFIGS``.

The MLP's down projection can take the SwiGLU activation in its load (:func:`swiglu_gemv`):

    y[n, o] = sum_k silu(gu[n, k]) gu[n, K + k] W[o, k]  (+ bias[o])  (+ res[n, o])

with gu = [gate | up] (N, 2K), the same kernel under ``SWIGLU``: each step loads the gate and up tiles
of every row and forms g / (1 + exp(-g)) u in fp32, not rounded before the product (one rounding of
y). It saves the separate ``swiglu`` launch, which counts at batch 1 where the step is a chain of
short kernels; in exchange every program recomputes the activation of all N x K inputs (once per
BLOCK_O weight rows) and holds two activation tiles per step. No GPU has measured which side wins
yet, so the runtime times fused against separate (``swiglu`` then :func:`pick_linear`'s choice) per
weight shape on the card (:func:`pick_swiglu_linear`) and keeps the faster.

A layer's input RMSNorm can ride in the GEMV that reads it (:func:`norm_gemv`, ``NORM``):

    y[n, o] = r_n sum_k h[n, k] g[k] W[o, k]  (+ bias[o])  (+ res[n, o]),   r_n = 1 / sqrt(mean_k h[n, k]^2 + eps)

Every program walks all of K, so it sums the row's squares as it loads and applies r_n to its sums at the
end. At batch 1 this removes the step's two norm launches a layer (the residual add moves into the
previous GEMV's epilogue); the cost is that each program reads the whole row of h and g, from L2.
:func:`pick_norm_linear` times it against the separate norm on the card, as for the SwiGLU fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import interpreting, launchable, pdl, use_triton
from ._triton import gdc_launch_dependents, gdc_wait, tl, triton
from .heuristics import GEMV_CONFIGS, GEMV_MAX_ROWS, GEMV_SPLIT_COUNTERS, GemvConfig, gemv_interpreter_config
from .rmsnorm import rmsnorm, rmsnorm_ref
from .swiglu import swiglu, swiglu_ref

__all__ = ["Linear", "NormLinear", "cuda_time_ms", "gemv", "gemv_ref", "norm_gemv", "norm_gemv_ref", "pick_linear",
           "pick_norm_linear", "pick_swiglu_linear", "swiglu_gemv", "swiglu_gemv_ref"]


@triton.jit
def _gemv_kernel(
    x_ptr,  # *T [N, K] activations ([N, 2K] = [gate | up] when SWIGLU), row stride stride_x, unit column stride
    w_ptr,  # *T [O, K] weight, contiguous
    b_ptr,  # *T [O] bias (read when HAS_BIAS)
    r_ptr,  # *T [N, O] residual added before rounding (read when HAS_RES), contiguous
    g_ptr,  # *T [K] RMSNorm scale applied to x (read when NORM)
    y_ptr,  # *T [N, O] output, contiguous
    ws_ptr,  # *fp32 [SPLIT_K, N, O] each split's sums (SPLIT_K > 1)
    cnt_ptr,  # *i32 one arrival counter per column block, 0 between launches (SPLIT_K > 1)
    N,
    O,
    K,
    stride_x,
    eps,  # the RMSNorm's epsilon (NORM)
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SWIGLU: tl.constexpr,  # x = silu(gate) * up, from columns k and K + k of each row, in fp32
    NORM: tl.constexpr,  # x = rmsnorm(x) * g: g folded into the load, 1 / rms applied to the row's sums at the end
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,  # programs (p, 0..SPLIT_K-1) share column block p's K range
    PDL: tl.constexpr = False,  # programmatic dependent launch (kernels._dispatch.pdl)
):
    """Program (p, s) computes y[:, p*BLOCK_O:(p+1)*BLOCK_O] over the s-th of SPLIT_K slices of K; with one
    slice it writes y itself, else it writes its fp32 sums to the workspace, and the last of the block's
    programs to arrive (an acq_rel atomic on the block's counter) adds them all, applies the epilogue and
    puts the counter back to 0 for the next launch (a CUDA graph replays the same counters)."""
    if PDL:  # wait for the previous kernel's writes, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(1) * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = tl.arange(0, BLOCK_N)
    om = offs_o < O
    nm = offs_n < N
    w_rows = w_ptr + offs_o.to(tl.int64)[:, None] * K
    if BLOCK_N == 1:  # x a vector, the sums in the tile's own layout: the 3-D form below moves each tile
        acc1 = tl.zeros((BLOCK_O, BLOCK_K), tl.float32)  # through shared memory (docs/PERFORMANCE.md, GPU)
        ss1 = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=om[:, None] & km[None, :], other=0.0).to(tl.float32)
            x1 = tl.load(x_ptr + ks, mask=km, other=0.0).to(tl.float32)
            if SWIGLU:
                x1 = x1 / (1.0 + tl.exp(-x1)) * tl.load(x_ptr + K + ks, mask=km, other=0.0).to(tl.float32)
            if NORM:
                ss1 += x1 * x1
                x1 = x1 * tl.load(g_ptr + ks, mask=km, other=0.0).to(tl.float32)
            acc1 += w * x1[None, :]
        y = tl.sum(acc1, axis=1)[None, :]  # (1, BLOCK_O)
        if NORM:
            y = y * (1.0 / tl.sqrt(tl.sum(ss1, axis=0) / K + eps))
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_O, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # NORM: each row's sum of squares, elementwise until the end
        x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_x
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=om[:, None] & km[None, :], other=0.0).to(tl.float32)
            xm = nm[:, None] & km[None, :]
            x = tl.load(x_rows + ks[None, :], mask=xm, other=0.0).to(tl.float32)
            if SWIGLU:  # x is the gate; the up half starts K columns on (masked lanes: 0 / 2 * 0 = 0)
                u = tl.load(x_rows + K + ks[None, :], mask=xm, other=0.0).to(tl.float32)
                x = x / (1.0 + tl.exp(-x)) * u
            if NORM:  # every program walks all K, so it sees the whole row: no other kernel needs to normalise it
                ss += x * x
                x = x * tl.load(g_ptr + ks, mask=km, other=0.0).to(tl.float32)[None, :]
            acc += x[:, None, :] * w[None, :, :]
        y = tl.sum(acc, axis=2)  # (BLOCK_N, BLOCK_O)
        if NORM:
            y = y * (1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps))[:, None]
    out = offs_n.to(tl.int64)[:, None] * O + offs_o[None, :]
    m = nm[:, None] & om[None, :]
    if SPLIT_K > 1:
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * N * O + out, y, mask=m)
        if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:  # the others' sums are visible
            y = tl.zeros((BLOCK_N, BLOCK_O), tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(ws_ptr + s * N * O + out, mask=m, other=0.0, cache_modifier=".cg")
            _gemv_epilogue(y, b_ptr, r_ptr, y_ptr, out, offs_o, om, m, HAS_BIAS, HAS_RES)
            tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        _gemv_epilogue(y, b_ptr, r_ptr, y_ptr, out, offs_o, om, m, HAS_BIAS, HAS_RES)


@triton.jit
def _gemv_epilogue(y, b_ptr, r_ptr, y_ptr, out, offs_o, om, m, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """y (+ bias) (+ residual), rounded once to y_ptr's dtype and stored."""
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_o, mask=om, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + out, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=m)


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, res: Tensor | None = None, *,
         config: GemvConfig | None = None) -> Tensor:
    """x (N, K) @ w (O, K)^T (+ bias (O,)) (+ res (N, O)) for N <= 8, in x's dtype (fp32 accumulation)."""
    if not use_triton(x):
        return gemv_ref(x, w, bias, res)
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} must be (N<={GEMV_MAX_ROWS}, K) and (O, K). "
                         "Fix: use F.linear for larger batches")
    return _launch(x, w, bias, res, swiglu=False, config=config, who="gemv")


def _launch(x: Tensor, w: Tensor, bias: Tensor | None, res: Tensor | None, *, swiglu: bool,
            config: GemvConfig | None, who: str, norm: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """Run ``_gemv_kernel`` on validated 2-D x and w (x's width is 2K under ``swiglu``, else K; ``norm``: the
    RMSNorm scale (K,) that x is normalised with in the kernel)."""
    n, o, k = x.shape[0], w.shape[0], w.shape[1]
    if res is not None and tuple(res.shape) != (n, o):
        raise ValueError(f"{who}: res has shape {tuple(res.shape)}, expected ({n}, {o})")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"{who}: bias has shape {tuple(bias.shape)}, expected ({o},) (one per row of w)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    y = torch.empty((n, o), device=x.device, dtype=x.dtype)
    if n == 0 or o == 0:
        return y
    cfg = config or GEMV_CONFIGS[0]
    if norm is not None and cfg.split_k > 1:
        raise ValueError(f"{who}: config {cfg.name} splits K, but the fused norm needs each program to see the "
                         "whole row. Fix: pass a config with split_k=1")
    cfg = gemv_interpreter_config(n, cfg.split_k) if interpreting() else cfg
    block_n = triton.next_power_of_2(n)
    blocks = triton.cdiv(o, cfg.block_o)
    ws, cnt = y, y
    if cfg.split_k > 1:
        if blocks > GEMV_SPLIT_COUNTERS:
            raise ValueError(f"{who}: {blocks} column blocks of {cfg.block_o}, more than the {GEMV_SPLIT_COUNTERS} "
                             "split-K counters. Fix: use a config with split_k=1 for this weight")
        ws = torch.empty((cfg.split_k, n, o), device=x.device, dtype=torch.float32)
        cnt = _split_counters(x.device)
    launchable(_gemv_kernel)[(blocks, cfg.split_k)](
        x, w, bias.contiguous() if bias is not None else w, res.contiguous() if res is not None else y,
        norm.contiguous() if norm is not None else w, y, ws, cnt, n, o, k, x.stride(0), float(eps),
        HAS_BIAS=bias is not None, HAS_RES=res is not None, SWIGLU=swiglu, NORM=norm is not None,
        BLOCK_N=block_n, BLOCK_O=cfg.block_o, BLOCK_K=cfg.block_k // block_n if cfg.scale_k else cfg.block_k,
        SPLIT_K=cfg.split_k, num_warps=cfg.warps, num_stages=cfg.stages, **pdl(w))
    return y


_COUNTERS: dict[torch.device, Tensor] = {}


def _split_counters(device: torch.device) -> Tensor:
    """The split-K GEMV's arrival counters on ``device``: zeroed once, left at zero by every launch, and
    never freed or replaced (a captured CUDA graph keeps their address). Made outside any capture: the
    step's warm-up runs before its capture, and the picks' timer runs its candidate before capturing it."""
    cnt = _COUNTERS.get(device)
    if cnt is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K GEMV's counters were first needed inside a CUDA graph capture. Fix: "
                               "run the step once before capturing it")
        cnt = _COUNTERS[device] = torch.zeros(GEMV_SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return cnt


def gemv_ref(x: Tensor, w: Tensor, bias: Tensor | None = None, res: Tensor | None = None) -> Tensor:
    """Torch reference: ``F.linear`` (+ res), in x's dtype."""
    y = F.linear(x, w, bias)
    return y if res is None else res + y


def swiglu_gemv(gu: Tensor, w: Tensor, bias: Tensor | None = None, res: Tensor | None = None, *,
                config: GemvConfig | None = None) -> Tensor:
    """silu(gate) * up @ w^T (+ bias) (+ res) for gu (N, 2K) = [gate | up] with N <= 8 and w (O, K): the
    MLP's down projection with its activation fused into the GEMV's load (``_gemv_kernel`` under
    ``SWIGLU``). fp32 math, the activation not rounded before the product, one rounding of y (N, O)
    to gu's dtype. The torch reference (:func:`swiglu_gemv_ref`) where Triton does not run. Whether
    this beats ``swiglu`` then a GEMV or cuBLAS is for :func:`pick_swiglu_linear` to measure."""
    if gu.dim() != 2 or w.dim() != 2:
        raise ValueError(f"swiglu_gemv: gu {tuple(gu.shape)} and w {tuple(w.shape)} must be 2-D, (N, 2K) and (O, K). "
                         "Fix: flatten the leading dims of gu")
    n, two_k = gu.shape
    if two_k % 2:
        raise ValueError(f"swiglu_gemv: gu's last dim {two_k} is odd. Fix: pass the fused [gate | up] projection "
                         "(N, 2K)")
    if w.shape[1] != two_k // 2:
        raise ValueError(f"swiglu_gemv: w {tuple(w.shape)} is {w.shape[1]} wide, gu {tuple(gu.shape)} holds "
                         f"{two_k // 2} activations a row. Fix: pass the down projection (O, K) with 2K = gu's width")
    if n > GEMV_MAX_ROWS:
        raise ValueError(f"swiglu_gemv: {n} rows, at most {GEMV_MAX_ROWS}. Fix: use swiglu then F.linear for larger "
                         "batches (pick_swiglu_linear does)")
    if not use_triton(gu):
        return swiglu_gemv_ref(gu, w, bias, res)
    return _launch(gu, w, bias, res, swiglu=True, config=config, who="swiglu_gemv")


def swiglu_gemv_ref(gu: Tensor, w: Tensor, bias: Tensor | None = None, res: Tensor | None = None) -> Tensor:
    """Torch reference: ``swiglu_ref`` (rounded to gu's dtype), then ``F.linear`` (+ res)."""
    return gemv_ref(swiglu_ref(gu), w, bias, res)


def norm_gemv(h: Tensor, g: Tensor, eps: float, w: Tensor, bias: Tensor | None = None, res: Tensor | None = None, *,
              config: GemvConfig | None = None) -> Tensor:
    """rmsnorm(h) * g @ w^T (+ bias) (+ res) for h (N, K) with N <= 8, g (K,), w (O, K): a layer's input norm
    fused into the GEMV that reads it (``_gemv_kernel`` under ``NORM``). Each program walks the whole row
    anyway, so it sums the squares as it loads, multiplies by g in the load, and scales its N x BLOCK_O
    sums by 1 / rms at the end: the normalised row is never written, and the step loses the norm's launch
    (with the previous stage's residual added in its GEMV's epilogue, the separate ``add_rmsnorm``). fp32
    math, the normalised input not rounded before the product, one rounding of y. The torch reference
    (:func:`norm_gemv_ref`) where Triton does not run; whether this beats the separate norm then a GEMV or
    cuBLAS is for :func:`pick_norm_linear` to measure."""
    if h.dim() != 2 or w.dim() != 2 or g.dim() != 1:
        raise ValueError(f"norm_gemv: h {tuple(h.shape)}, g {tuple(g.shape)} and w {tuple(w.shape)} must be (N, K), "
                         "(K,) and (O, K). Fix: flatten the leading dims of h")
    n, k = h.shape
    if w.shape[1] != k or g.shape[0] != k or k == 0:
        raise ValueError(f"norm_gemv: h {tuple(h.shape)}, g {tuple(g.shape)} and w {tuple(w.shape)} disagree on the "
                         "width K (or it is 0). Fix: pass the norm and the weight of the layer that reads h")
    if n > GEMV_MAX_ROWS:
        raise ValueError(f"norm_gemv: {n} rows, at most {GEMV_MAX_ROWS}. Fix: use rmsnorm then F.linear for larger "
                         "batches (pick_norm_linear does)")
    if not use_triton(h):
        return norm_gemv_ref(h, g, eps, w, bias, res)
    return _launch(h, w, bias, res, swiglu=False, config=config, who="norm_gemv", norm=g, eps=eps)


def norm_gemv_ref(h: Tensor, g: Tensor, eps: float, w: Tensor, bias: Tensor | None = None,
                  res: Tensor | None = None) -> Tensor:
    """Torch reference: ``rmsnorm_ref`` (rounded to h's dtype), then ``F.linear`` (+ res)."""
    return gemv_ref(rmsnorm_ref(h, g, eps), w, bias, res)


Linear = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]
NormLinear = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]  # (h, g, w, bias, res)


def _cublas(x: Tensor, w: Tensor, bias: Tensor | None, res: Tensor | None) -> Tensor:
    y = F.linear(x, w, bias)
    return y if res is None else y.add_(res)


def pick_linear(n: int, w: Tensor, *, with_res: bool, reps: int = 20,
                times: dict[str, float | None] | None = None) -> tuple[Linear, str]:
    """The faster of cuBLAS and the Triton GEMV configs for ``n`` rows times ``w``, timed on the device
    (CUDA events, median of ``reps``); returns the callable and its name. Off CUDA, or for more than
    GEMV_MAX_ROWS rows, cuBLAS (torch) without timing. ``times``, if given, gets each timed candidate's
    milliseconds by name (None: it did not compile or launch), as do the other picks'."""
    if not w.is_cuda or n > GEMV_MAX_ROWS or not use_triton(w):
        return _cublas, "cublas"
    x = torch.randn(n, w.shape[1], device=w.device, dtype=w.dtype)
    res = torch.randn(n, w.shape[0], device=w.device, dtype=w.dtype) if with_res else None
    cands: list[tuple[str, Linear]] = [("cublas", _cublas)]
    for c in GEMV_CONFIGS:
        cands.append((c.name, lambda x, w, b, r, c=c: gemv(x, w, b, r, config=c)))
    return _fastest(cands, (x, w, None, res), reps, times=times)


def pick_swiglu_linear(n: int, w: Tensor, *, reps: int = 20,
                       times: dict[str, float | None] | None = None) -> tuple[Linear, str]:
    """The fastest way to compute swiglu(gu) @ w^T (+ bias) (+ res) for ``n`` rows of gu (n, 2K) and the
    down projection ``w`` (O, K) on this card, timed like :func:`pick_linear` (CUDA events, median of
    ``reps``, a candidate that fails to compile or launch is skipped). Candidates: the separate path,
    ``swiglu`` then :func:`pick_linear`'s choice (named ``swiglu+<its name>``), and :func:`swiglu_gemv`
    under each of ``GEMV_CONFIGS`` (``fused_swiglu_<config name>``); the fused kernel is not assumed
    to win because no GPU has measured it yet. The callable takes (gu, w, bias, res). Off CUDA, for
    more than GEMV_MAX_ROWS rows, or where Triton is not in use: the separate path with cuBLAS (torch),
    untimed, ``swiglu+cublas``."""
    lin, lin_name = pick_linear(n, w, with_res=False, reps=reps, times=times)
    separate: tuple[str, Linear] = (f"swiglu+{lin_name}", lambda gu, w, b, r: lin(swiglu(gu), w, b, r))
    if not w.is_cuda or n > GEMV_MAX_ROWS or not use_triton(w):
        return separate[1], separate[0]
    gu = torch.randn(n, 2 * w.shape[1], device=w.device, dtype=w.dtype)
    cands = [separate]
    for c in GEMV_CONFIGS:
        cands.append((f"fused_swiglu_{c.name}", lambda gu, w, b, r, c=c: swiglu_gemv(gu, w, b, r, config=c)))
    return _fastest(cands, (gu, w, None, None), reps, times=times)


def pick_norm_linear(n: int, w: Tensor, eps: float, *, separate: tuple[Linear, str] | None = None,
                     fused_only: bool = False, reps: int = 20, configs: Sequence[GemvConfig] = GEMV_CONFIGS,
                     times: dict[str, float | None] | None = None) -> tuple[NormLinear, str]:
    """The fastest way to compute rmsnorm(h) * g @ w^T (+ bias) (+ res) for ``n`` rows of h on this card,
    timed like :func:`pick_linear`. Candidates: the separate path, ``rmsnorm`` then ``separate`` (a
    :func:`pick_linear` result, picked here if not given; named ``rmsnorm+<its name>``), and
    :func:`norm_gemv` under each of ``configs`` (``fused_norm_<config name>``; the runtime passes the
    configs that were fastest for the plain GEMV of this weight, whose loads the fused kernel shares, to
    spare compiles and timing); ``fused_only`` leaves the separate path out unless no fused config runs.
    The callable takes (h, g, w, bias, res). Off CUDA, for more than GEMV_MAX_ROWS rows, or where Triton is
    not in use: the separate path, untimed."""
    lin, lin_name = separate or pick_linear(n, w, with_res=False, reps=reps, times=times)
    sep: tuple[str, NormLinear] = (f"rmsnorm+{lin_name}", lambda h, g, w, b, r: lin(rmsnorm(h, g, eps), w, b, r))
    if not w.is_cuda or n > GEMV_MAX_ROWS or not use_triton(w):
        return sep[1], sep[0]
    h = torch.randn(n, w.shape[1], device=w.device, dtype=w.dtype)
    g = torch.rand(w.shape[1], device=w.device, dtype=w.dtype) + 0.5
    cands = [] if fused_only else [sep]
    for c in (c for c in configs if c.split_k == 1):  # the norm needs the whole row in every program
        cands.append((f"fused_norm_{c.name}", lambda h, g, w, b, r, c=c: norm_gemv(h, g, eps, w, b, r, config=c)))
    return _fastest(cands, (h, g, w, None, None), reps, fallback=sep, times=times)


def _fastest(cands: list[tuple[str, Callable]], args: tuple, reps: int,
             fallback: tuple[str, Callable] | None = None,
             times: dict[str, float | None] | None = None) -> tuple[Callable, str]:
    """The candidate with the least median time on ``args`` (``fallback``, else the first, if none runs), and
    its name; each candidate's milliseconds into ``times`` (None where it failed)."""
    best, best_t = fallback or cands[0], float("inf")
    for name, fn in cands:
        try:
            t = cuda_time_ms(lambda fn=fn: fn(*args), reps)
        except Exception:  # a config that does not compile or launch for this shape is not a candidate
            if times is not None:
                times[name] = None
            continue
        if times is not None:
            times[name] = round(t, 5)
        if t < best_t:
            best, best_t = (name, fn), t
    return best[1], best[0]


def cuda_time_ms(fn: Callable[[], Tensor], reps: int) -> float:
    """Milliseconds of device time per call of ``fn``: median of ``reps``, after three warm-up calls (compiles).

    Timed as the decode step runs: ``fn`` is captured once in a CUDA graph and each timed replay follows a
    write of twice the L2 cache, so that (1) the host's launch cost, which the step's own graph does not pay,
    is not measured: the flush keeps the device busy while the events and the replay are queued; and
    (2) the operands come from HBM, as in a step, where every layer's weights and cache were evicted by
    the layers between. The eager back-to-back timing it replaced is launch-bound for short kernels (a
    Triton launch from Python outlasts a batch-1 GEMV or attention), which made the per-bucket picks
    unreliable: in GPU run 4 they gave a batch-1 step 17% slower than the fixed kernel's
    (docs/PERFORMANCE.md, GPU). A ``fn`` that cannot be captured (a host
    read) is timed eagerly, with the same flush."""
    for _ in range(3):
        fn()
    dev = torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
    flush = torch.empty(max(2 * l2, 1 << 26) // 4, dtype=torch.int32, device=dev)
    run: Callable[[], object] = fn
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    try:
        with torch.cuda.stream(side):
            fn()  # a side stream first, as torch asks before a capture: lazy set-ups happen outside it
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # not capturable (a host read, a sync): eager, still behind the flush
        torch.cuda.synchronize(dev)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    run()
    for s, e in zip(start, end, strict=True):
        flush.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize(dev)
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end, strict=True))
    return times[len(times) // 2]
