"""The decode step on the GPU path: the fewest launches per layer, each near its memory bound.

Per layer, with ``x`` the normalised input of the next stage carried between stages:

    attention   qkv = x Wqkv^T (+b)                       cuBLAS or the Triton GEMV (picked per shape)
                q = rope_cache(qkv)                       q/k norm, rotary, K/V written at each row's slot
                y = attn_decode(q, K, V, pos + 1)         split-K over the cache when programs are few
                h += y Wo^T; x = norm(h)                  GEMV, then the residual add and the next norm
    MLP         a = swiglu(x Wgu^T); h += a Wd^T; x = norm(h)

so 8 launches a layer (the unfused step took 13: separate norm, rotary, two cache scatters, residual
adds). A sliced layer's shortcut rides in its output GEMV as ``[y | h] @ [W | S]^T`` (h is replaced,
then normalised). Every shape is static and lengths live in tensors, so the runtime replays the step as
one CUDA graph per batch bucket. Which GEMV implementation serves a weight is measured per (rows,
shape) on the card when a graph is built (:meth:`FusedDecode.tune`); the choice is kept for that bucket.

The same code runs the kernels in the Triton interpreter (tests) and their torch references on a
plain CPU, so its structure is tested without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.kernels.attn_decode import attn_decode, attn_decode_sdpa
from layerfold.kernels.gemv import Linear, gemv, pick_linear
from layerfold.kernels.heuristics import GEMV_MAX_ROWS
from layerfold.kernels.rmsnorm import add_rmsnorm, rmsnorm
from layerfold.kernels.rope_cache import rope_cache
from layerfold.kernels.swiglu import swiglu

__all__ = ["DECODE_ATTENTION", "FusedDecode", "decode_attention"]

# The decode attention LAYERFOLD_DECODE_ATTN selects: the kernel over each row's own slots (the default),
# torch's SDPA over the whole static cache with a length mask (GPU run 3: 1.10x end to end at 64 rows with
# the cache 75% full, 0.98x at 16; it reads every slot, so it loses where the cache is sized far past the
# contexts), and the kernel's two prepared loop forms (kernels.attn_decode: values loaded with the keys;
# tensor-core dots), which gpu_suite's decode-sdpa part measures end to end beside the others.
DECODE_ATTENTION = {"kernel": attn_decode, "sdpa": attn_decode_sdpa,
                    "early": partial(attn_decode, kv_early=True), "dot": partial(attn_decode, dot=True)}


def decode_attention(name: str):
    """The attention function for ``name`` (a key of DECODE_ATTENTION); an unknown name is an error naming
    the choices, before any model is built."""
    if name not in DECODE_ATTENTION:
        raise ValueError(f"LAYERFOLD_DECODE_ATTN={name!r} is unknown. Fix: use one of {', '.join(DECODE_ATTENTION)}")
    return DECODE_ATTENTION[name]


@dataclass
class _Stage:
    kind: str  # "attn" | "mlp" | "shortcut" (a layer's attention or MLP replaced by its shortcut matrix alone)
    layer: object  # decode_net._Layer
    norm: Tensor | None  # the RMSNorm weight applied to this stage's input (None: it reads h itself)
    w: Tensor | None = None  # the shortcut matrix of a "shortcut" stage


class FusedDecode:
    """Decode steps of a :class:`~layerfold.inference.decode_net.DecodeNet` with the fused kernels."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        stages: list[_Stage] = []
        for l in net.layers:
            if l.wqkv is not None:
                stages.append(_Stage("attn", l, l.attn_norm))
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
        self.attn = decode_attention(os.environ.get("LAYERFOLD_DECODE_ATTN", "kernel"))

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
        and keep the faster per weight; returns how many weights each implementation got."""
        by_shape: dict[tuple[int, ...], tuple[Linear, str]] = {}
        picked: dict[str, int] = {}
        for w in self.weights():
            key = tuple(w.shape)
            if key not in by_shape:
                by_shape[key] = pick_linear(rows, w, with_res=False)
            self.choice[(rows, id(w))] = by_shape[key]
            name = by_shape[key][1].split("_")[0]
            picked[name] = picked.get(name, 0) + 1
        return picked

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
                y = self.attn(q.view(n, l.n_kv, l.n_heads // l.n_kv, l.hd), l.k, l.v, lengths, window=net.window)
                h, x = self._out(y.reshape(n, l.n_heads * l.hd), l.wo, h, l.fused_attn_sc, nxt)
            elif s.kind == "mlp":
                a = swiglu(self._lin(x, l.wgu))
                h, x = self._out(a, l.wd, h, l.fused_mlp_sc, nxt)
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
        out = self._lin(y, w)
        if nxt is None:
            return h.add_(out), h
        return h, add_rmsnorm(h, out, nxt, eps)
