"""The decode step on the GPU path: the fewest launches per layer, each near its memory bound.

Per layer, with ``x`` the normalised input of the next stage carried between stages:

    attention   qkv = x Wqkv^T (+b)                       cuBLAS or the Triton GEMV (picked per shape)
                q = rope_cache(qkv)                       q/k norm, rotary, K/V written at each row's slot
                y = attn_decode(q, K, V, pos + 1)         split-K over the cache when programs are few
                h += y Wo^T; x = norm(h)                  GEMV, then the residual add and the next norm
    MLP         gu = x Wgu^T; h += swiglu(gu) Wd^T; x = norm(h)   the activation fused into the down GEMV
                                                          or its own launch (picked per shape)

so 7-9 launches a layer (the unfused step took 13: separate norm, rotary, two cache scatters, residual
adds). A sliced layer's shortcut rides in its output GEMV as ``[y | h] @ [W | S]^T`` (h is replaced,
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
from layerfold.kernels.gemv import Linear, cuda_time_ms, gemv, pick_linear, pick_swiglu_linear, swiglu_gemv
from layerfold.kernels.heuristics import GEMV_MAX_ROWS
from layerfold.kernels.rmsnorm import add_rmsnorm, rmsnorm
from layerfold.kernels.rope_cache import rope_cache
from layerfold.kernels.swiglu import swiglu

__all__ = ["ATTN_FORMS", "DECODE_ATTENTION", "FusedDecode", "decode_attention"]

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
        implementation got."""
        by_shape: dict[tuple[int, ...], tuple[Linear, str]] = {}
        picked: dict[str, int] = {}
        downs = {id(s.layer.wd) for s in self.stages if s.kind == "mlp" and not s.layer.fused_mlp_sc}
        for w in self.weights():
            key = (tuple(w.shape), id(w) in downs)
            if key not in by_shape:  # a down projection: its activation fused into the GEMV, or not
                by_shape[key] = (pick_swiglu_linear(rows, w) if key[1] else pick_linear(rows, w, with_res=False))
            fn, full = by_shape[key]
            if key[1]:
                self.down_choice[(rows, id(w))] = fn
                name = "fused-swiglu" if full.startswith("fused") else full.split("_")[0]  # "swiglu+triton"
            else:
                self.choice[(rows, id(w))] = by_shape[key]
                name = full.split("_")[0]
            picked[name] = picked.get(name, 0) + 1
        if self.attn_mode == "auto" and self.net.embed.is_cuda:
            picked.update(self.tune_attention(rows))
        return picked

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
                by_key[s.akey] = self._pick_attention(rows, s.layer, s.akey, timer)
            fn, name = by_key[s.akey]
            self.attn_choice[(rows, s.akey)] = fn
            picked[name] = picked.get(name, 0) + 1
        return picked

    def _pick_attention(self, rows: int, l, akey: tuple[int, ...], timer) -> tuple[Callable[..., Tensor], str]:
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
            if t is not None and (best is None or t < best[0]):
                best = (t, name, fn)
        return (best[2], best[1]) if best is not None else (attn_decode, "attn:kernel")

    def _lin(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        hit = self.choice.get((x.shape[0], id(w)))
        if hit is not None:
            return hit[0](x, w, b, None)
        if not x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS:  # the interpreter (tests) or the torch reference
            return gemv(x, w, b)
        return F.linear(x, w, b)

    # ---- the step ------------------------------------------------------------------------------------
    def __call__(self, tok: Tensor, pos: Tensor) -> Tensor:
        """tok, pos (n,) int64 on the device: row b reads tok[b], writes it at slot pos[b]; fp32 logits (n, V)."""
        net = self.net
        eps = net.eps
        n = tok.shape[0]
        lengths = pos + 1
        h = F.embedding(tok, net.embed)  # (n, d)
        x = rmsnorm(h, self.first_norm, eps) if self.first_norm is not None else h
        for s, nxt in zip(self.stages, self.next_norm, strict=True):
            l = s.layer
            if s.kind == "attn":
                qkv = self._lin(x, l.wqkv, l.bqkv)
                q = rope_cache(qkv, getattr(net, f"cos{l.hd}"), getattr(net, f"sin{l.hd}"), pos, l.k, l.v,
                               n_heads=l.n_heads, n_kv=l.n_kv, q_norm=l.q_norm, k_norm=l.k_norm, eps=eps)
                attn = self.attn_choice.get((n, s.akey), self.attn)
                y = attn(q.view(n, l.n_kv, l.n_heads // l.n_kv, l.hd), l.k, l.v, lengths, window=net.window)
                h, x = self._out(y.reshape(n, l.n_heads * l.hd), l.wo, h, l.fused_attn_sc, nxt)
            elif s.kind == "mlp":
                gu = self._lin(x, l.wgu)
                if l.fused_mlp_sc:  # [a | h] @ [Wd | S]^T: the activation cannot ride in that GEMV's load
                    h, x = self._out(swiglu(gu), l.wd, h, True, nxt)
                else:
                    h, x = self._residual(h, self._down(gu, l.wd), nxt)
            else:
                h = self._lin(h, s.w)
                x = rmsnorm(h, nxt, eps) if nxt is not None else h
        return self._lin(x, net.head).float()

    def _out(self, y: Tensor, w: Tensor, h: Tensor, fused_shortcut: bool, nxt: Tensor | None) -> tuple[Tensor, Tensor]:
        """A branch's output projection into the residual, and the next stage's normalised input."""
        eps = self.net.eps
        if fused_shortcut:  # [y | h] @ [W | S]^T replaces h
            h = self._lin(torch.cat([y, h], -1), w)
            return h, (rmsnorm(h, nxt, eps) if nxt is not None else h)
        return self._residual(h, self._lin(y, w), nxt)

    def _residual(self, h: Tensor, out: Tensor, nxt: Tensor | None) -> tuple[Tensor, Tensor]:
        """h += out, and the next stage's normalised input."""
        if nxt is None:
            return h.add_(out), h
        return h, add_rmsnorm(h, out, nxt, self.net.eps)

    def _down(self, gu: Tensor, wd: Tensor) -> Tensor:
        """swiglu(gu) @ wd^T: the pick for this many rows (tune), else fused where the GEMV serves these rows
        off CUDA (the interpreter, or its torch reference), else the activation then the product."""
        hit = self.down_choice.get((gu.shape[0], id(wd)))
        if hit is not None:
            return hit(gu, wd, None, None)
        if not gu.is_cuda and gu.shape[0] <= GEMV_MAX_ROWS:
            return swiglu_gemv(gu, wd)
        return self._lin(swiglu(gu), wd)

