"""The decode step on the GPU path: the fewest launches per layer, each near its memory bound.

Per layer, with ``x`` the normalised input of the next stage carried between stages:

    attention   qkv = x Wqkv^T (+b)                       cuBLAS or the Triton GEMV (picked per shape)
                q = rope_cache(qkv)                       q/k norm, rotary, K/V written at each row's slot
                y = attn_decode(q, K, V, pos + 1)         split-K over the cache when programs are few
                h += y Wo^T; x = norm(h)                  GEMV, then the residual add and the next norm
    MLP         gu = x Wgu^T; h += swiglu(gu) Wd^T; x = norm(h)   the activation fused into the down GEMV
                                                          or its own launch (picked per shape)

so 7-9 launches a layer (the unfused step took 13: separate norm, rotary, two cache scatters, residual
adds). Where the Triton GEMV serves the rows (batch <= 8), a stage's input norm can also ride in the GEMV
that reads it (``x`` is then None between stages: the residual is added in the previous GEMV's epilogue
and the QKV or gate|up GEMV normalises h as it loads it; kernels.gemv.norm_gemv), which leaves 6 launches
a layer; LAYERFOLD_NORM_GEMV (NORM_GEMV_MODES) says whether that is timed per shape, forced, or off.
A sliced layer's shortcut rides in its output GEMV as ``[y | h] @ [W | S]^T`` (h is replaced,
then normalised). Every shape is static and lengths live in tensors, so the runtime replays the step as
one CUDA graph per batch bucket. Which GEMV implementation serves a weight, and which form of the
attention kernel serves a layer's attention, are measured per (rows, shape) on the card when a graph is
built (:meth:`FusedDecode.tune`); the choices are kept for that bucket.

The same code runs the kernels in the Triton interpreter (tests) and their torch references on a
plain CPU, so its structure is tested without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.kernels.attn_decode import attn_decode, attn_decode_ref, attn_decode_sdpa, planned_splits
from layerfold.kernels.gemv import (
    Linear,
    NormLinear,
    cuda_time_ms,
    gemv,
    norm_gemv,
    pick_linear,
    pick_norm_linear,
    pick_swiglu_linear,
    swiglu_gemv,
)
from layerfold.kernels.heuristics import GEMV_CONFIGS, GEMV_MAX_ROWS, GemvConfig
from layerfold.kernels.rmsnorm import add_rmsnorm, rmsnorm
from layerfold.kernels.rope_cache import rope_cache
from layerfold.kernels.swiglu import swiglu

__all__ = ["ATTN_FORMS", "DECODE_ATTENTION", "NORM_GEMV_MODES", "FusedDecode", "decode_attention"]

# LAYERFOLD_NORM_GEMV: whether a stage's input RMSNorm rides in the GEMV that reads it (kernels.gemv.norm_gemv):
# "auto" (the default) times it against the separate norm per weight shape when a bucket's graph is built
# (tune), fused only where it was faster; "fused" fuses wherever the Triton GEMV serves the rows (the fastest
# fused config on CUDA; the interpreter off it); "off" never. It removes two launches a layer at batch 1.
NORM_GEMV_MODES = ("auto", "fused", "off")

# The decode attention LAYERFOLD_DECODE_ATTN selects: "auto" (the default) times the kernel's loop forms
# (ATTN_FORMS) per batch bucket and layer shape when the runtime builds that bucket's CUDA graph, and keeps
# the fastest whose output agrees with the reference (FusedDecode.tune_attention); elsewhere, and until a
# bucket is tuned, the plain kernel. The fixed choices: the kernel over each row's own slots; torch's SDPA
# over the whole static cache with a length mask (GPU run 3: 1.10x end to end at 64 rows with the cache 75%
# full, 0.98x at 16; it reads every slot, so it loses where the cache is sized far past the contexts: it is
# never picked by "auto", whose timing cannot know how full the cache will be); and the kernel's loop forms
# (kernels.attn_decode: values loaded with the keys; tensor-core dots). Why timing on the card rather than
# one default: run 3 measured the plain kernel at 24-50% of the bandwidth, and the dot form compiles for
# sm_90 to pipelined asynchronous copies and tensor-core products (docs/PERFORMANCE.md), which no GPU had
# measured when this was written. gpu_suite's decode-sdpa part runs every choice end to end.
ATTN_FORMS: dict[str, dict[str, bool]] = {"kernel": {}, "early": {"kv_early": True}, "dot": {"dot": True}}
DECODE_ATTENTION = {"kernel": attn_decode, "sdpa": attn_decode_sdpa,
                    "early": partial(attn_decode, kv_early=True), "dot": partial(attn_decode, dot=True)}


def decode_attention(name: str):
    """The attention function for ``name`` ("auto" or a key of DECODE_ATTENTION; "auto" gives the plain
    kernel until :meth:`FusedDecode.tune_attention` picks); an unknown name is an error naming the choices,
    before any model is built."""
    if name == "auto":
        return attn_decode
    if name not in DECODE_ATTENTION:
        raise ValueError(f"LAYERFOLD_DECODE_ATTN={name!r} is unknown. Fix: use one of auto, "
                         f"{', '.join(DECODE_ATTENTION)}")
    return DECODE_ATTENTION[name]


def _fastest_configs(times: dict[str, float | None], k: int) -> list[GemvConfig]:
    """The ``k`` unsplit Triton GEMV configs that were fastest in ``times`` (a plain GEMV pick's; all unsplit
    GEMV_CONFIGS where none was timed, as off CUDA)."""
    by_name = {c.name: c for c in GEMV_CONFIGS if c.split_k == 1}  # the fused norm needs whole rows
    ran = sorted((t, name) for name, t in times.items() if t is not None and name in by_name)
    return [by_name[name] for _, name in ran[:k]] or list(by_name.values())


@dataclass
class _Stage:
    kind: str  # "attn" | "mlp" | "shortcut" (a layer's attention or MLP replaced by its shortcut matrix alone)
    layer: object  # decode_net._Layer
    norm: Tensor | None  # the RMSNorm weight applied to this stage's input (None: it reads h itself)
    w: Tensor | None = None  # the shortcut matrix of a "shortcut" stage
    akey: tuple[int, ...] | None = None  # an "attn" stage's launch shape: (KV heads, group, head dim, slots)


class FusedDecode:
    """Decode steps of a :class:`~layerfold.inference.decode_net.DecodeNet` with the fused kernels."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        stages: list[_Stage] = []
        for l in net.layers:
            if l.wqkv is not None:
                akey = (l.n_kv, l.n_heads // l.n_kv, l.hd, l.k.shape[2])
                stages.append(_Stage("attn", l, l.attn_norm, akey=akey))
            elif l.attn_sc is not None:
                stages.append(_Stage("shortcut", l, None, l.attn_sc))
            if l.wgu is not None:
                stages.append(_Stage("mlp", l, l.mlp_norm))
            elif l.mlp_sc is not None:
                stages.append(_Stage("shortcut", l, None, l.mlp_sc))
        self.stages = stages
        # norm of what each stage leaves behind: the next stage's input norm, the final norm after the last
        self.next_norm = [s.norm for s in stages[1:]] + [net.final_norm]
        self.first_norm = stages[0].norm if stages else net.final_norm
        self.choice: dict[tuple[int, int], tuple[Linear, str]] = {}  # (rows, id(weight)) -> GEMV and its name
        self.down_choice: dict[tuple[int, int], Linear] = {}  # (rows, id(Wd)) -> swiglu(gu) @ Wd^T, fused or not
        self.attn_mode = os.environ.get("LAYERFOLD_DECODE_ATTN", "auto")
        self.attn = decode_attention(self.attn_mode)
        self.attn_choice: dict[tuple[int, tuple[int, ...]], Callable[..., Tensor]] = {}  # (rows, akey) -> form
        # the matrix that reads each stage's normalised output (the next stage's input GEMV; the head last)
        self.next_w = [self._reads_norm(s) for s in stages[1:]] + [net.head if net.final_norm is not None else None]
        self.first_w = self._reads_norm(stages[0]) if stages else (net.head if net.final_norm is not None else None)
        self.norm_mode = os.environ.get("LAYERFOLD_NORM_GEMV", "auto")
        if self.norm_mode not in NORM_GEMV_MODES:
            raise ValueError(f"LAYERFOLD_NORM_GEMV={self.norm_mode!r} is unknown. Fix: use one of "
                             f"{', '.join(NORM_GEMV_MODES)}")
        self.norm_choice: dict[tuple[int, int], NormLinear] = {}  # (rows, id(weight)) -> its norm fused in
        # rows -> what was timed ("gemv OxK", "down OxK", "norm OxK", "attn kv,g,hd,slots") -> candidate -> ms
        self.timings: dict[int, dict[str, dict[str, float | None]]] = {}

    @staticmethod
    def _reads_norm(s: _Stage) -> Tensor | None:
        """The weight of the GEMV that reads stage ``s``'s normalised input (None: the stage reads h)."""
        if s.norm is None:
            return None
        return s.layer.wqkv if s.kind == "attn" else s.layer.wgu

    # ---- GEMV choice ---------------------------------------------------------------------------------
    def weights(self) -> list[Tensor]:
        """Every matrix a step multiplies."""
        out: list[Tensor] = []
        for s in self.stages:
            l = s.layer
            out += [l.wqkv, l.wo] if s.kind == "attn" else [l.wgu, l.wd] if s.kind == "mlp" else [s.w]
        return out + [self.net.head]

    def tune(self, rows: int) -> dict[str, int]:
        """Time cuBLAS against the Triton GEMV for every distinct weight shape at ``rows`` rows (CUDA only)
        and keep the faster per weight, and with LAYERFOLD_DECODE_ATTN=auto the attention's form per layer
        shape (:meth:`tune_attention`); returns how many weights (attention layers, as "attn:<form>") each
        implementation got. Every candidate's time is kept in ``timings[rows]``."""
        by_shape: dict[tuple[int, ...], tuple[Linear, str]] = {}
        times = self.timings.setdefault(rows, {})
        picked: dict[str, int] = {}
        downs = {id(s.layer.wd) for s in self.stages if s.kind == "mlp" and not s.layer.fused_mlp_sc}
        for w in self.weights():
            key = (tuple(w.shape), id(w) in downs)
            if key not in by_shape:  # a down projection: its activation fused into the GEMV, or not
                t = times.setdefault(f"{'down' if key[1] else 'gemv'} {w.shape[0]}x{w.shape[1]}", {})
                by_shape[key] = (pick_swiglu_linear(rows, w, times=t) if key[1]
                                 else pick_linear(rows, w, with_res=False, times=t))
            fn, full = by_shape[key]
            if key[1]:
                self.down_choice[(rows, id(w))] = fn
                name = "fused-swiglu" if full.startswith("fused") else full.split("_")[0]  # "swiglu+triton"
            else:
                self.choice[(rows, id(w))] = by_shape[key]
                name = full.split("_")[0]
            picked[name] = picked.get(name, 0) + 1
        if self.norm_mode != "off":
            self._tune_norms(rows, picked)
        if self.attn_mode == "auto" and self.net.embed.is_cuda:
            picked.update(self.tune_attention(rows))
        return picked

    def _tune_norms(self, rows: int, picked: dict[str, int]) -> None:
        """Per weight that reads a normalised input: its norm fused into its GEMV (``fused-norm`` in ``picked``,
        in place of the weight's GEMV name) where that was faster than the norm then the GEMV picked above
        (``fused`` mode: wherever a fused config runs). Off CUDA nothing is timed and nothing is fused here."""
        by_shape: dict[tuple[int, ...], tuple[NormLinear, str]] = {}
        times = self.timings.setdefault(rows, {})
        for w in {id(w): w for w in [self.first_w, *self.next_w] if w is not None}.values():
            sep = self.choice[(rows, id(w))]
            if tuple(w.shape) not in by_shape:
                shape = f"{w.shape[0]}x{w.shape[1]}"
                by_shape[tuple(w.shape)] = pick_norm_linear(
                    rows, w, self.net.eps, separate=sep, fused_only=self.norm_mode == "fused",
                    configs=_fastest_configs(times.get(f"gemv {shape}", {}), 2),
                    times=times.setdefault(f"norm {shape}", {}))
            fn, name = by_shape[tuple(w.shape)]
            if name.startswith("fused"):
                self.norm_choice[(rows, id(w))] = fn
                old = sep[1].split("_")[0]
                picked[old] -= 1
                if not picked[old]:
                    del picked[old]
                picked["fused-norm"] = picked.get("fused-norm", 0) + 1

    def tune_attention(self, rows: int, timer: Callable[[Callable[[], Tensor]], float] | None = None
                       ) -> dict[str, int]:
        """Pick the attention kernel's form for ``rows`` rows per distinct layer shape: each of ATTN_FORMS, and
        each in one pass where the default plans key-range splits, is first checked against the fp32
        reference on a scratch cache (a form that disagrees is no candidate), then timed on the layer's own
        cache (read only: a live server's rows stay intact) with every row at half the cache's slots; the
        fastest is kept, the plain kernel on ties. ``timer`` returns seconds for a call (default: CUDA
        events, median of 10). Returns how many attention layers each "attn:<form>" got."""
        timer = timer or (lambda fn: cuda_time_ms(fn, 10) / 1e3)
        by_key: dict[tuple[int, ...], tuple[Callable[..., Tensor], str]] = {}
        picked: dict[str, int] = {}
        for s in self.stages:
            if s.kind != "attn":
                continue
            if s.akey not in by_key:
                t = self.timings.setdefault(rows, {}).setdefault("attn " + ",".join(map(str, s.akey)), {})
                by_key[s.akey] = self._pick_attention(rows, s.layer, s.akey, timer, t)
            fn, name = by_key[s.akey]
            self.attn_choice[(rows, s.akey)] = fn
            picked[name] = picked.get(name, 0) + 1
        return picked

    def _pick_attention(self, rows: int, l, akey: tuple[int, ...], timer,
                        times: dict[str, float | None] | None = None) -> tuple[Callable[..., Tensor], str]:
        kv, g, hd, slots = akey
        dev, dt, window = l.k.device, l.k.dtype, self.net.window
        cands: list[tuple[str, Callable[..., Tensor]]] = []
        one_pass = planned_splits(rows, kv, g, hd, slots, dev) > 1
        for form, kw in ATTN_FORMS.items():
            cands.append((f"attn:{form}", partial(attn_decode, **kw)))
            if one_pass:
                cands.append((f"attn:{form}-1split", partial(attn_decode, splits=1, **kw)))
        gen = torch.Generator(device=dev).manual_seed(0)
        r2, s2 = min(rows, 2), min(slots, 1024)  # the check's scratch cache: small whatever the real one
        k = torch.randn(r2, kv, s2, hd, device=dev, generator=gen).to(dt)
        v = torch.randn(r2, kv, s2, hd, device=dev, generator=gen).to(dt)
        q = torch.randn(r2, kv, g, hd, device=dev, generator=gen).to(dt)
        lens = torch.randint(1, s2 + 1, (r2,), device=dev, generator=gen)
        ref = attn_decode_ref(q, k, v, lens, window=window).float()
        tol = 1e-3 if dt == torch.float32 else 3e-2
        q_run = torch.randn(rows, kv, g, hd, device=dev, generator=gen).to(dt)
        l_run = torch.full((rows,), max(1, slots // 2), device=dev, dtype=torch.long)
        best: tuple[float, str, Callable[..., Tensor]] | None = None
        for name, fn in cands:
            try:
                ok = float((fn(q, k, v, lens, window=window).float() - ref).abs().max()) <= tol
                t = timer(lambda fn=fn: fn(q_run, l.k, l.v, l_run, window=window)) if ok else None
            except Exception:  # a form that does not compile or launch for this shape is no candidate
                t = None
            if times is not None:
                times[name] = None if t is None else round(t * 1e3, 5)
            if t is not None and (best is None or t < best[0]):
                best = (t, name, fn)
        return (best[2], best[1]) if best is not None else (attn_decode, "attn:kernel")

    def _lin(self, x: Tensor, w: Tensor, b: Tensor | None = None, res: Tensor | None = None) -> Tensor:
        hit = self.choice.get((x.shape[0], id(w)))
        if hit is not None:
            return hit[0](x, w, b, res)
        if not x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS:  # the interpreter (tests) or the torch reference
            return gemv(x, w, b, res)
        y = F.linear(x, w, b)
        return y if res is None else y.add_(res)

    def _norm_fn(self, n: int, w: Tensor | None) -> NormLinear | None:
        """How the GEMV of ``w`` takes its input's norm at ``n`` rows: a callable (h, g, w, bias, res) where the
        norm is fused into it (tune's pick; with LAYERFOLD_NORM_GEMV=fused off CUDA, the interpreter's kernel
        or its reference), None where the norm runs before it."""
        if w is None:
            return None
        hit = self.norm_choice.get((n, id(w)))
        if hit is not None or self.norm_mode != "fused" or w.is_cuda or n > GEMV_MAX_ROWS:
            return hit
        eps = self.net.eps
        return lambda h, g, w, b, r: norm_gemv(h, g, eps, w, b, r)

    def _normed(self, h: Tensor, norm: Tensor | None, w: Tensor | None) -> Tensor | None:
        """The normalised input for the GEMV of ``w``, or None where that GEMV normalises h itself."""
        if norm is None:
            return h
        return None if self._norm_fn(h.shape[0], w) is not None else rmsnorm(h, norm, self.net.eps)

    def _in(self, x: Tensor | None, h: Tensor, norm: Tensor | None, w: Tensor, b: Tensor | None = None) -> Tensor:
        """x @ w^T (+ b), or rmsnorm(h) @ w^T (+ b) in one GEMV where x is None."""
        if x is not None:
            return self._lin(x, w, b)
        return self._norm_fn(h.shape[0], w)(h, norm, w, b, None)

    # ---- the step ------------------------------------------------------------------------------------
    def __call__(self, tok: Tensor, pos: Tensor) -> Tensor:
        """tok, pos (n,) int64 on the device: row b reads tok[b], writes it at slot pos[b]; fp32 logits (n, V)."""
        net = self.net
        eps = net.eps
        n = tok.shape[0]
        lengths = pos + 1
        h = F.embedding(tok, net.embed)  # (n, d)
        x = self._normed(h, self.first_norm, self.first_w)  # None while the next GEMV normalises h itself
        for s, nxt, nw in zip(self.stages, self.next_norm, self.next_w, strict=True):
            l = s.layer
            if s.kind == "attn":
                qkv = self._in(x, h, s.norm, l.wqkv, l.bqkv)
                q = rope_cache(qkv, getattr(net, f"cos{l.hd}"), getattr(net, f"sin{l.hd}"), pos, l.k, l.v,
                               n_heads=l.n_heads, n_kv=l.n_kv, q_norm=l.q_norm, k_norm=l.k_norm, eps=eps)
                attn = self.attn_choice.get((n, s.akey), self.attn)
                y = attn(q.view(n, l.n_kv, l.n_heads // l.n_kv, l.hd), l.k, l.v, lengths, window=net.window)
                h, x = self._out(y.reshape(n, l.n_heads * l.hd), l.wo, h, l.fused_attn_sc, nxt, nw)
            elif s.kind == "mlp":
                gu = self._in(x, h, s.norm, l.wgu)
                if l.fused_mlp_sc:  # [a | h] @ [Wd | S]^T: the activation cannot ride in that GEMV's load
                    h, x = self._out(swiglu(gu), l.wd, h, True, nxt, nw)
                elif nxt is not None and self._norm_fn(n, nw) is not None:  # the residual in the GEMV's epilogue
                    h, x = self._down(gu, l.wd, h), None
                else:
                    h, x = self._residual(h, self._down(gu, l.wd), nxt)
            else:
                h = self._lin(h, s.w)
                x = self._normed(h, nxt, nw)
        return self._in(x, h, net.final_norm, net.head).float()

    def _out(self, y: Tensor, w: Tensor, h: Tensor, fused_shortcut: bool, nxt: Tensor | None,
             nw: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A branch's output projection into the residual, and the next stage's normalised input (None where
        the next GEMV normalises h itself: the residual is then added in this GEMV's epilogue)."""
        if fused_shortcut:  # [y | h] @ [W | S]^T replaces h
            h = self._lin(torch.cat([y, h], -1), w)
            return h, self._normed(h, nxt, nw)
        if nxt is not None and self._norm_fn(y.shape[0], nw) is not None:
            return self._lin(y, w, res=h), None
        return self._residual(h, self._lin(y, w), nxt)

    def _residual(self, h: Tensor, out: Tensor, nxt: Tensor | None) -> tuple[Tensor, Tensor]:
        """h += out, and the next stage's normalised input."""
        if nxt is None:
            return h.add_(out), h
        return h, add_rmsnorm(h, out, nxt, self.net.eps)

    def _down(self, gu: Tensor, wd: Tensor, res: Tensor | None = None) -> Tensor:
        """swiglu(gu) @ wd^T (+ res): the pick for this many rows (tune), else fused where the GEMV serves these
        rows off CUDA (the interpreter, or its torch reference), else the activation then the product."""
        hit = self.down_choice.get((gu.shape[0], id(wd)))
        if hit is not None:
            return hit(gu, wd, None, res)
        if not gu.is_cuda and gu.shape[0] <= GEMV_MAX_ROWS:
            return swiglu_gemv(gu, wd, None, res)
        return self._lin(swiglu(gu), wd, None, res)

