"""The runtime's math: fused weights, static KV caches, a prefill and a one-token decode step.

``DecodeNet`` is an ``nn.Module`` whose weights and caches are buffers, so ``torch.compile`` with
inductor's freezing can treat the weights as constants (and pre-pack them for oneDNN) while the
caches stay mutable inputs. Its ``forward`` is one decode step; ``prefill`` runs prompts. The
bookkeeping (which row is how long, limits, CUDA graphs) lives in ``layerfold.inference.runtime.Runtime``.

Per layer the decode step is four GEMVs (q|k|v fused, o, gate|up fused, down) plus RMSNorm, rotary,
cache write, attention and SwiGLU. A sliced layer's shortcut matrix S (the residual's change of basis)
rides along in its branch's output GEMV: ``[y | h] @ [W | S]^T`` is one product over one concatenated
weight, so a sliced model has no extra GEMV, no extra add and no per-layer special case.

Grouped-query attention never repeats K/V: q is viewed as
(B, n_kv, group, hd), so each KV head serves its query heads as a "query length" of ``group``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerfold.core.model import Block, Model, rope_cos_sin, rope_inv_freq
from layerfold.core.spec import ModelSpec
from layerfold.inference.fused_step import FusedDecode
from layerfold.kernels.attn_decode import attn_decode, attn_decode_ref
from layerfold.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from layerfold.kernels.rotary import rotary, rotary_ref
from layerfold.kernels.swiglu import swiglu, swiglu_ref

__all__ = ["BACKENDS", "DecodeNet", "attend_reduce", "can_pack", "decode_weight_bytes", "fused_weights"]

BACKENDS = {  # name -> (rmsnorm, rotary, swiglu, attention-decode)
    "torch": (rmsnorm_ref, rotary_ref, swiglu_ref, attn_decode_ref),
    "triton": (rmsnorm, rotary, swiglu, attn_decode),
}
_Cast = Callable[[Tensor | None], Tensor | None]


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN pre-packed weights on CPU: packed GEMVs beat F.linear on plain weights in bf16 and fp32
    (bench/bench_decode.py, its packed-vs-plain GEMV chain; docs/PERFORMANCE.md)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 8, dtype=dtype), pack(torch.ones(4, 8, dtype=dtype))
        out = packed_linear_add(x, w, packed_linear(x, w))
        return bool(torch.equal(out, torch.full((2, 4), 16.0, dtype=dtype)))
    except (RuntimeError, AttributeError):
        return False


def pack(w: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)  # blocked layout for GEMV (batch-size hint 1)


def packed_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def packed_linear_add(x: Tensor, w: Tensor, res: Tensor) -> Tensor:
    """res + x @ w.T with the add fused into the GEMV's epilogue (one pass, one rounding)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, res, w, None, "add")


def linear_add(x: Tensor, w: Tensor, res: Tensor) -> Tensor:
    return res + F.linear(x, w)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_weight_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Weight bytes one decode step reads: every layer matrix and norm, the final norm and the head
    (the embedding table is read one row per token, so a tied head counts once)."""
    n = spec.vocab_size * spec.d_final + spec.d_final
    for l in spec.layers:
        if l.has_attn:
            n += l.d_in + l.d_in * (l.q_dim + 2 * l.kv_dim) + l.q_dim * l.d_mid
            n += (l.q_dim + 2 * l.kv_dim) if spec.qkv_bias else 0
            n += 2 * l.head_dim if spec.qk_norm else 0
        n += l.d_in * l.d_mid if l.attn_shortcut else 0
        if l.has_mlp:
            n += l.d_mid + 2 * l.d_mid * l.d_ffn + l.d_ffn * l.d_out
        n += l.d_mid * l.d_out if l.mlp_shortcut else 0
    return n * torch.empty((), dtype=dtype).element_size()


def attend_reduce(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Decode attention written as products and sums: q (n, kv, g, hd) against the cache prefix k, v
    (n, kv, L, hd), fp32 softmax, mask (n, 1, 1, L) or None. Under torch.compile inductor fuses this
    (with the cache write) into one loop nest; SDPA's CPU flash kernel cost about twice as much per
    layer at one query token (docs/PERFORMANCE.md, decode attention). Eager, the broadcast
    products would be materialised: the eager path keeps SDPA."""
    s = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1)[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)


def fused_weights(blk: Block) -> dict[str, Tensor | None]:
    """A block's matrices as the decode step multiplies them (plain tensors, the block's dtype): q|k|v
    stacked, gate|up stacked, output projections with their shortcut matrix appended ([W | S]), and a
    shortcut alone where the layer has no branch to carry it."""
    a, m = blk.attn, blk.mlp
    cat = lambda mod, shortcut: mod.weight if shortcut is None else torch.cat([mod.weight, shortcut.weight], 1)
    return {
        "wqkv": None if a is None else torch.cat([a.q.weight, a.k.weight, a.v.weight]),  # (q + 2 kv, d_in)
        "wo": None if a is None else cat(a.o, blk.attn_shortcut),  # (d_mid, q [+ d_in])
        "attn_sc": None if a is not None or blk.attn_shortcut is None else blk.attn_shortcut.weight,
        "wgu": None if m is None else torch.cat([m.gate.weight, m.up.weight]),  # (2 d_ffn, d_mid)
        "wd": None if m is None else cat(m.down, blk.mlp_shortcut),  # (d_out, d_ffn [+ d_mid])
        "mlp_sc": None if m is not None or blk.mlp_shortcut is None else blk.mlp_shortcut.weight,
    }


class _Layer(nn.Module):
    """One layer's fused weights and KV cache as buffers (None where the layer has no such part)."""

    def __init__(self, blk: Block, cast: _Cast, mat: _Cast, cache_shape: tuple[int, int] | None,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        a, m, ls = blk.attn, blk.mlp, blk.spec
        self.n_heads, self.n_kv, self.hd = ls.n_heads, ls.n_kv_heads, ls.head_dim
        vec = lambda mod: None if mod is None else cast(mod.weight)
        self.fused_attn_sc = a is not None and blk.attn_shortcut is not None  # wo is [o | S]: input [y | h]
        self.fused_mlp_sc = m is not None and blk.mlp_shortcut is not None  # wd is [down | S]: input [act | h]
        bufs: dict[str, Tensor | None] = {name: mat(w) for name, w in fused_weights(blk).items()}
        bufs.update({"attn_norm": vec(blk.attn_norm), "mlp_norm": vec(blk.mlp_norm), "bqkv": None,
                     "q_norm": None, "k_norm": None, "k": None, "v": None})
        if a is not None:
            bufs["bqkv"] = None if a.q.bias is None else cast(torch.cat([a.q.bias, a.k.bias, a.v.bias]))
            bufs["q_norm"], bufs["k_norm"] = vec(a.q_norm), vec(a.k_norm)
            assert cache_shape is not None
            shape = (cache_shape[0], self.n_kv, cache_shape[1], self.hd)  # (max_batch, n_kv, max_len, hd)
            bufs["k"] = torch.zeros(shape, device=device, dtype=dtype)
            bufs["v"] = torch.zeros(shape, device=device, dtype=dtype)
        for name, t in bufs.items():
            self.register_buffer(name, t)


class DecodeNet(nn.Module):
    """Fused weights, rotary tables and caches of ``model``; ``forward(tok, pos, L)`` is a decode step."""

    def __init__(self, model: Model, *, max_batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 backend: str, packed: bool, compiled: bool = False):
        super().__init__()
        spec = model.spec
        self.eps, self.window, self.max_len = spec.norm_eps, spec.sliding_window, max_len
        self.norm, self.rope, self.act, self.attn = BACKENDS[backend]
        self.lin: Callable[..., Tensor] = packed_linear if packed else F.linear
        self.lin_add: Callable[[Tensor, Tensor, Tensor], Tensor] = packed_linear_add if packed else linear_add
        self.cpu_attn: Callable[..., Tensor] = attend_reduce if compiled else _sdpa
        with torch.no_grad():
            cast = lambda t: None if t is None else t.detach().to(device, dtype).contiguous()
            mat = (lambda t: None if t is None else pack(cast(t))) if packed else cast
            self.register_buffer("embed", cast(model.embed.weight))
            self.register_buffer("head", mat(model.head_weight()))
            self.register_buffer("final_norm", cast(model.norm.weight))
            self.layers = nn.ModuleList(_Layer(b, cast, mat, (max_batch, max_len) if b.attn is not None else None,
                                               device, dtype) for b in model.layers)
        self.hds = sorted({l.hd for l in self.layers if l.wqkv is not None})
        # rotary tables, every slot: the model's own formula (fp32 angle, times YaRN's / longrope's attention factor,
        # cast to the compute dtype). longrope: a decode step at slot p uses the regime of p + 1 (the long factors
        # from slot original_max on), a prefill that of its prompt's length (its rows of lcos/lsin when longer)
        self.longrope = spec.rope_original_max_pos if spec.rope_type == "longrope" else None
        pos = torch.arange(max_len)[None]
        for hd in self.hds:
            cos, sin = (t[0, 0].to(device) for t in rope_cos_sin(rope_inv_freq(spec, hd), pos, dtype,
                                                                 spec.rope_attention_factor))
            if self.longrope is not None:
                lcos, lsin = (t[0, 0].to(device) for t in rope_cos_sin(rope_inv_freq(spec, hd, long=True), pos, dtype,
                                                                       spec.rope_attention_factor))
                cos[self.longrope:], sin[self.longrope:] = lcos[self.longrope:], lsin[self.longrope:]
                self.register_buffer(f"lcos{hd}", lcos)
                self.register_buffer(f"lsin{hd}", lsin)
            self.register_buffer(f"cos{hd}", cos)
            self.register_buffer(f"sin{hd}", sin)
        self.register_buffer("rows", torch.arange(max_batch, device=device))
        # the Triton backend decodes with the fused kernels (inference/fused_step.py); prefill stays unfused
        self.fused = FusedDecode(self) if backend == "triton" else None

    # ---- decode ----------------------------------------------------------------------------------
    def forward(self, tok: Tensor, pos: Tensor, L: int | None = None) -> Tensor:
        """tok, pos (n,): row b reads tok[b] and writes it at slot pos[b]; returns fp32 logits (n, V).

        L: keys to attend (max(pos) + 1) over the cache prefix on the torch path; the Triton backend
        (FusedDecode) ignores it and reads each row's length from ``pos + 1`` (static shapes, CUDA graphs).
        """
        if self.fused is not None:
            return self.fused(tok, pos)
        n = tok.shape[0]
        h = F.embedding(tok, self.embed)  # (n, d)
        ropes = {hd: (getattr(self, f"cos{hd}")[pos], getattr(self, f"sin{hd}")[pos]) for hd in self.hds}  # (n, hd)
        mask = None
        if L is not None and (n > 1 or (self.window is not None and L > self.window)):
            j = torch.arange(L, device=pos.device)[None, :]
            valid = j <= pos[:, None]
            if self.window is not None:
                valid = valid & (j > pos[:, None] - self.window)
            mask = valid[:, None, None, :]  # (n, 1, 1, L): each row's keys, for all its query heads
        rows = self.rows[:n]
        for l in self.layers:
            if l.wqkv is not None:
                cos, sin = ropes[l.hd]
                q, k, v = self._qkv(l, self.lin(self.norm(h, l.attn_norm, self.eps), l.wqkv, l.bqkv), cos, sin)
                l.k[rows, :, pos] = k  # each row's new token at its own slot
                l.v[rows, :, pos] = v
                qg = q.reshape(n, l.n_kv, l.n_heads // l.n_kv, l.hd)  # (n, n_kv, group, hd)
                y = self.cpu_attn(qg, l.k[:n, :, :L], l.v[:n, :, :L], mask)
                h = self._out(y.reshape(n, l.n_heads * l.hd), l.wo, h, l.fused_attn_sc)
            elif l.attn_sc is not None:
                h = self.lin(h, l.attn_sc)
            h = self._mlp(l, h)
        return self.lin(self.norm(h, self.final_norm, self.eps), self.head).float()

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self, ids: Tensor, rows: slice | Tensor, last: Tensor) -> Tensor:
        """ids (n, T) right-padded prompts written to cache ``rows`` from slot 0; returns fp32 logits
        (n, V) at positions ``last`` (n,) (each prompt's last token)."""
        n, T = ids.shape
        h = F.embedding(ids, self.embed)  # (n, T, d)
        mask = None
        if self.window is not None and T > self.window:
            i = torch.arange(T, device=ids.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        ropes = {hd: self._prefill_rope(hd, n, T, last) for hd in self.hds}
        for l in self.layers:
            if l.wqkv is not None:
                cos, sin = ropes[l.hd]
                qkv = self.lin(self.norm(h, l.attn_norm, self.eps), l.wqkv, l.bqkv)  # (n, T, q + 2 kv)
                q, k, v = self._qkv(l, qkv.reshape(n * T, -1), cos, sin)
                q = q.view(n, T, l.n_heads, l.hd).transpose(1, 2)  # (n, nh, T, hd)
                k = k.view(n, T, l.n_kv, l.hd).transpose(1, 2)  # (n, n_kv, T, hd)
                v = v.view(n, T, l.n_kv, l.hd).transpose(1, 2)
                l.k[rows, :, :T] = k
                l.v[rows, :, :T] = v
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   enable_gqa=l.n_kv != l.n_heads)
                y = y.transpose(1, 2).reshape(n, T, l.n_heads * l.hd)
                h = self._out(y, l.wo, h, l.fused_attn_sc)
            elif l.attn_sc is not None:
                h = self.lin(h, l.attn_sc)
            h = self._mlp(l, h)
        h = h[torch.arange(n, device=ids.device), last]  # (n, d_final): the head runs on last tokens only
        return self.lin(self.norm(h, self.final_norm, self.eps), self.head).float()

    def _prefill_rope(self, hd: int, n: int, T: int, last: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (n*T, hd) of n right-padded prompts of T slots; longrope: a prompt longer than the original
        context (last + 1 > original_max) reads the long factors' table at every position, as transformers'
        forward over that prompt does."""
        cos, sin = getattr(self, f"cos{hd}")[:T], getattr(self, f"sin{hd}")[:T]  # (T, hd)
        if self.longrope is None or T <= self.longrope:
            return cos.repeat(n, 1), sin.repeat(n, 1)
        long = (last + 1 > self.longrope)[:, None, None]  # (n, 1, 1)
        pick = lambda short, lng: torch.where(long, lng[None], short[None]).reshape(n * T, hd)  # noqa: E731
        return pick(cos, getattr(self, f"lcos{hd}")[:T]), pick(sin, getattr(self, f"lsin{hd}")[:T])

    # ---- shared pieces ---------------------------------------------------------------------------
    def _qkv(self, l: _Layer, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv (N, q + 2 kv) -> rotated q (N, nh, hd), rotated k (N, n_kv, hd), v (N, n_kv, hd)."""
        N = qkv.shape[0]
        nqk = l.n_heads + l.n_kv
        v = qkv[:, nqk * l.hd:].view(N, l.n_kv, l.hd)
        if l.q_norm is None:  # q and k heads are adjacent in the row: rotate them in one call
            qk = self.rope(qkv[:, :nqk * l.hd].view(N, nqk, l.hd), cos, sin)
            return qk[:, :l.n_heads], qk[:, l.n_heads:], v
        q = self.norm(qkv[:, :l.n_heads * l.hd].view(N, l.n_heads, l.hd), l.q_norm, self.eps)
        k = self.norm(qkv[:, l.n_heads * l.hd:nqk * l.hd].view(N, l.n_kv, l.hd), l.k_norm, self.eps)
        return self.rope(q, cos, sin), self.rope(k, cos, sin), v

    def _out(self, y: Tensor, w: Tensor, h: Tensor, fused_shortcut: bool) -> Tensor:
        """A branch's output projection plus the residual: h + y @ W^T, or with a shortcut matrix folded
        into the weight, [y | h] @ [W | S]^T (one GEMV, no add)."""
        return self.lin(torch.cat([y, h], -1), w) if fused_shortcut else self.lin_add(y, w, h)

    def _mlp(self, l: _Layer, h: Tensor) -> Tensor:
        if l.wgu is not None:
            a = self.act(self.lin(self.norm(h, l.mlp_norm, self.eps), l.wgu))
            return self._out(a, l.wd, h, l.fused_mlp_sc)
        return h if l.mlp_sc is None else self.lin(h, l.mlp_sc)
