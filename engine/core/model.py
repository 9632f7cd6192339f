"""One model implementation for every ModelSpec: dense Llama/Mistral/Qwen2/Qwen3 and any pruned shape.

Grouped-query attention, rotary embeddings (default / linear / Llama-3 / YaRN / longrope scaling), RMSNorm, SwiGLU,
tied or untied head, optional qkv bias and q/k norm, per-layer widths and shortcut matrices.
Calibration, surgery, healing, evaluation and the runtime all run this code.

Weight names (what ``state_dict()`` and the checkpoint use)::

    embed.weight                       (V, d_model)
    layers.{i}.attn_norm.weight        (d_in,)
    layers.{i}.attn.{q,k,v}.weight     (n_heads*hd | n_kv*hd, d_in)   [+ .bias with qkv_bias]
    layers.{i}.attn.{q,k}_norm.weight  (hd,)                            [qk_norm]
    layers.{i}.attn.o.weight           (d_mid, n_heads*hd)
    layers.{i}.attn_shortcut.weight    (d_mid, d_in)                    [attn_shortcut]
    layers.{i}.mlp_norm.weight         (d_mid,)
    layers.{i}.mlp.{gate,up}.weight    (d_ffn, d_mid)
    layers.{i}.mlp.down.weight         (d_out, d_ffn)
    layers.{i}.mlp_shortcut.weight     (d_out, d_mid)                   [mlp_shortcut]
    norm.weight                        (d_final,)
    lm_head.weight                     (V, d_final)                     [not tie_embeddings]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.core.state import check_state, check_state_dict


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# ---- rotary ----------------------------------------------------------------------------------------
def rope_inv_freq(spec: ModelSpec, head_dim: int, long: bool = False) -> Tensor:
    """Inverse frequencies, with linear, Llama-3 ("llama3"), YaRN ("yarn") or longrope scaling applied as HF does
    (longrope: frequency i divided by short_factor[i], or by long_factor[i] where ``long``); (head_dim / 2,).
    Partial rotary (spec.rotary_dim): the frequencies of rotary_dim dims, as HF computes them for
    partial_rotary_factor, then zeros (pairs that do not turn: the pass-through dims, core.partial_rotary)."""
    rot = spec.rotary_dim or head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    if spec.rope_type == "longrope":
        inv = inv / torch.tensor(spec.rope_long_factor if long else spec.rope_short_factor, dtype=torch.float64)
    elif spec.rope_type == "linear":
        inv = inv / spec.rope_factor
    elif spec.rope_type == "llama3":
        old = spec.rope_original_max_pos
        low_wl = old / spec.rope_low_freq_factor
        high_wl = old / spec.rope_high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / spec.rope_factor, inv)
        smooth = (old / wl - spec.rope_low_freq_factor) / (spec.rope_high_freq_factor - spec.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.rope_factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif spec.rope_type == "yarn":
        inv = _yarn(inv.float(), spec, rot)  # (HF computes YaRN's frequencies in fp32)
    return F.pad(inv.float(), (0, head_dim // 2 - rot // 2))


def _yarn(inv: Tensor, spec: ModelSpec, head_dim: int) -> Tensor:
    """YaRN: frequency pair i keeps its frequency where it turns more than beta_fast times over the pretraining
    context, is divided by rope_factor where it turns fewer than beta_slow times, and blends linearly between."""
    def dim_at(rotations: float) -> float:  # the pair index whose wavelength fits `rotations` times in the context
        turns = spec.rope_original_max_pos / (rotations * 2 * math.pi)
        return head_dim * math.log(turns) / (2 * math.log(spec.rope_theta))

    lo, hi = dim_at(spec.rope_beta_fast), dim_at(spec.rope_beta_slow)
    if spec.rope_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
    return inv / spec.rope_factor * ramp + inv * (1 - ramp)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, hd) in the rotate-half layout HF Llama uses, times ``scale``
    (YaRN's and longrope's attention factor: spec.rope_attention_factor). inv_freq: (hd/2,), or (B, 1, hd/2)
    for frequencies chosen per row (longrope)."""
    f = inv_freq.to(positions.device)
    ang = positions.to(torch.float32)[..., None] * f  # (B,T,hd/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]  # (B,1,T,hd)
    if scale != 1.0:  # (not the pairs of frequency 0: partial rotary's pass-through dims, which HF leaves unscaled)
        s = torch.where(f == 0, 1.0, scale).expand_as(ang)
        s = torch.cat([s, s], dim=-1)[:, None]
        return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(spec: ModelSpec, cache: dict[Any, Tensor], head_dim: int, positions: Tensor,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (B, 1, T, hd) of ``spec``'s rotary for positions (B, T); ``cache`` keeps the frequencies per head
    size and device (the caller's dict).

    longrope, as transformers computes it: each forward picks the long factors when max(position_ids) + 1 exceeds
    the original context, else the short ones, for all its positions. Here the pick is per row (a row's furthest
    position), which for one sequence is exactly that, and for a batch is each sequence as if run alone. A
    cached decode step at position p therefore uses the regime of p + 1; what keys already cached keep is the
    caller's business (the Runtime recomputes a sequence that crosses the original context, as
    Phi3ForCausalLM.generate does: inference.runtime)."""
    key = (head_dim, positions.device)
    if key not in cache:
        inv = rope_inv_freq(spec, head_dim)
        if spec.rope_type == "longrope":  # (2, hd/2): short, long
            inv = torch.stack([inv, rope_inv_freq(spec, head_dim, long=True)])
        cache[key] = inv.to(positions.device)
    inv = cache[key]
    if inv.dim() == 2:
        long = (positions.amax(-1) + 1 > spec.rope_original_max_pos).long()  # (B,)
        inv = inv[long][:, None, :]  # (B, 1, hd/2)
    return rope_cos_sin(inv, positions, dtype, spec.rope_attention_factor)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


# ---- KV cache ----------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Preallocated per-layer cache sized by each layer's own KV heads; ``length`` slots are filled."""

    k: list[Tensor | None]  # per layer (B, n_kv, S_max, hd) or None for attention-free layers
    v: list[Tensor | None]
    length: int = 0

    @classmethod
    def allocate(cls, spec: ModelSpec, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> KVCache:
        ks, vs = [], []
        for l in spec.layers:
            if l.has_attn:
                shape = (batch, l.n_kv_heads, max_len, l.head_dim)
                ks.append(torch.zeros(shape, device=device, dtype=dtype))
                vs.append(torch.zeros(shape, device=device, dtype=dtype))
            else:
                ks.append(None)
                vs.append(None)
        return cls(ks, vs, 0)

    @property
    def capacity(self) -> int:
        for k in self.k:
            if k is not None:
                return k.shape[2]
        return 1 << 30


# ---- blocks ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, ls: LayerSpec, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = ls.n_heads, ls.n_kv_heads, ls.head_dim
        self.q = nn.Linear(ls.d_in, ls.q_dim, bias=spec.qkv_bias)
        self.k = nn.Linear(ls.d_in, ls.kv_dim, bias=spec.qkv_bias)
        self.v = nn.Linear(ls.d_in, ls.kv_dim, bias=spec.qkv_bias)
        self.o = nn.Linear(ls.q_dim, ls.d_mid, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(ls.head_dim, spec.norm_eps)
            self.k_norm = RMSNorm(ls.head_dim, spec.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                idx: int, taps: dict[str, Tensor] | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            s = cache.length
            cache.k[idx][:, :, s:s + T] = k
            cache.v[idx][:, :, s:s + T] = v
            k, v = cache.k[idx][:, :, :s + T], cache.v[idx][:, :, :s + T]
        if self.n_kv != self.n_heads:  # GQA: query head h reads KV head h // group
            g = self.n_heads // self.n_kv
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, nh*hd)
        if taps is not None:
            taps["o_in"] = y
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_ffn: int, d_out: int):
        super().__init__()
        self.gate = nn.Linear(d_in, d_ffn, bias=False)
        self.up = nn.Linear(d_in, d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d_out, bias=False)

    def forward(self, x: Tensor, taps: dict[str, Tensor] | None = None) -> Tensor:
        g, u = self.gate(x), self.up(x)
        if taps is not None:
            taps["gate"], taps["up"] = g, u
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    """One layer of any kind: [norm -> attention] + residual, [norm -> SwiGLU] + residual."""

    def __init__(self, ls: LayerSpec, spec: ModelSpec):
        super().__init__()
        self.spec = ls
        eps = spec.norm_eps
        self.attn_norm = RMSNorm(ls.d_in, eps) if ls.has_attn else None
        self.attn = Attention(ls, spec) if ls.has_attn else None
        self.attn_shortcut = nn.Linear(ls.d_in, ls.d_mid, bias=False) if ls.attn_shortcut else None
        self.mlp_norm = RMSNorm(ls.d_mid, eps) if ls.has_mlp else None
        self.mlp = MLP(ls.d_mid, ls.d_ffn, ls.d_out) if ls.has_mlp else None
        self.mlp_shortcut = nn.Linear(ls.d_mid, ls.d_out, bias=False) if ls.mlp_shortcut else None

    def forward(self, h: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                mask: Tensor | None = None, cache: KVCache | None = None, idx: int = 0,
                taps: dict[str, Tensor] | None = None) -> Tensor:
        if taps is not None:
            taps["attn_in"] = h
        if self.attn is not None:
            a = self.attn(self.attn_norm(h), cos, sin, mask, cache, idx, taps)
            h = (self.attn_shortcut(h) if self.attn_shortcut is not None else h) + a
        elif self.attn_shortcut is not None:
            h = self.attn_shortcut(h)
        if taps is not None:
            taps["mlp_in"] = h
        if self.mlp is not None:
            m = self.mlp(self.mlp_norm(h), taps)
            h = (self.mlp_shortcut(h) if self.mlp_shortcut is not None else h) + m
        elif self.mlp_shortcut is not None:
            h = self.mlp_shortcut(h)
        return h


def attention_mask(q_len: int, start: int, key_valid: Tensor | None, sliding_window: int | None,
                   device: torch.device) -> Tensor | None:
    """Boolean (B|1, 1, T, S) mask, True = attend. None when plain causal SDPA suffices."""
    S = start + q_len
    if key_valid is None and sliding_window is None and start == 0:
        return None
    qi = torch.arange(start, S, device=device)[:, None]
    kj = torch.arange(S, device=device)[None, :]
    m = kj <= qi
    if sliding_window is not None:
        m = m & (kj > qi - sliding_window)
    m = m[None, None]
    if key_valid is not None:
        m = m & key_valid[:, :S].to(torch.bool)[:, None, None, :]
        # a padding query with no valid key would give NaN rows: let it attend to itself
        m = m | (~m.any(-1, keepdim=True) & (kj == qi))
    return m


class Model(nn.Module):
    """A decoder-only LM built from a ModelSpec; ``forward(ids)`` returns logits (B, T, V)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, not {type(spec).__name__}. Fix: pass the spec of a model "
                            "(model.spec, layerfold.load_spec_state(path)[0], or ModelSpec.from_json(text))")
        spec.validate()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = nn.ModuleList(Block(l, spec) for l in spec.layers)
        self.norm = RMSNorm(spec.d_final, spec.norm_eps)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.d_final, spec.vocab_size, bias=False)
        self._inv_freq: dict[Any, Tensor] = {}

    # ---- pieces used by layer-by-layer code (calibration, healing) --------------------------------
    def head_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions: Tensor, dtype: torch.dtype) -> dict[int, tuple[Tensor, Tensor]]:
        """cos/sin per distinct head_dim for positions (B, T)."""
        out = {}
        for l in self.spec.layers:
            if l.has_attn and l.head_dim not in out:
                out[l.head_dim] = rope_tables(self.spec, self._inv_freq, l.head_dim, positions, dtype)
        return out

    def run_layer(self, i: int, h: Tensor, ropes: dict[int, tuple[Tensor, Tensor]], mask: Tensor | None,
                  cache: KVCache | None = None, taps: dict[str, Tensor] | None = None) -> Tensor:
        ls = self.spec.layers[i]
        cos, sin = ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
        return self.layers[i](h, cos, sin, mask, cache, i, taps)

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(self.norm(h), self.head_weight())

    def prepare(self, ids: Tensor, positions: Tensor | None = None, key_valid: Tensor | None = None,
                start: int = 0) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]], Tensor | None]:
        """Embeddings, rotary tables and the attention mask for ids (B, T) written at cache slot ``start``."""
        B, T = ids.shape
        if positions is None:
            if key_valid is not None:  # left or right padding: positions count valid tokens only
                pos_all = (key_valid.long().cumsum(-1) - 1).clamp_min(0)
                positions = pos_all[:, start:start + T]
            else:
                positions = torch.arange(start, start + T, device=ids.device)[None].expand(B, T)
        h = self.embed(ids)
        ropes = self.rope(positions, h.dtype)
        mask = attention_mask(T, start, key_valid, self.spec.sliding_window, ids.device)
        return h, ropes, mask

    def forward(self, ids: Tensor, *, positions: Tensor | None = None, key_valid: Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only).

        key_valid: (B, S) bool, False for padding, covering the cache slots and these T tokens.
        cache: filled from slot ``cache.length``; its length advances by T.
        """
        start = cache.length if cache is not None else 0
        h, ropes, mask = self.prepare(ids, positions, key_valid, start)
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, ropes, mask, cache)
        if cache is not None:
            cache.length += ids.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    # ---- bookkeeping -----------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a model of ``spec`` and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = Model(spec)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def require_model(model: Any, what: str = "model") -> None:
    """A TypeError naming the fix when ``model`` is not a layerfold Model (a path, a tokenizer, an HF model)."""
    if not isinstance(model, Model):
        raise TypeError(f"{what} must be a layerfold Model, not {type(model).__name__}. Fix: load one first: model, "
                        "tok = layerfold.load(path)")


def build_model(spec: ModelSpec, state: dict[str, Tensor] | None = None, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, strict: bool = True) -> Model:
    """Allocate a Model on the meta device and fill it from ``state`` (shape-checked), or init randomly."""

    check_state(state)
    if state is None:
        m = Model(spec)
        init_weights(m)
        return m.to(device=device, dtype=dtype or torch.float32)
    with torch.device("meta"):
        m = Model(spec)
    check_state_dict({k: tuple(v.shape) for k, v in m.state_dict().items()}, state, strict=strict)
    m.load_state_dict(state, strict=strict, assign=True)
    return m.to(device=device, dtype=dtype) if dtype is not None else m.to(device=device)


def init_weights(m: Model, std: float = 0.02, seed: int | None = None) -> None:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.normal_(0, std, generator=g)
            else:
                p.normal_(0, std, generator=g)
