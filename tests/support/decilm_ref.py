"""A reference DeciLM / Nemotron-NAS model written from vLLM's nemotron_nas.py semantics, for the tests.

It reads an export the way vLLM does: the config through ``AutoConfig.from_pretrained(dir,
trust_remote_code=True)`` (the export's own configuration_decilm.py), ``block_configs[i]`` by attribute,
the FFN width from ``ffn_mult`` when the FFN section has that attribute (vLLM's
``_ffn_mult_to_intermediate_size``), else from ``intermediate_size``; weights by their HF Llama names.
Per layer (vLLM's DeciLMDecoderLayer, residual kept apart and added back)::

    attention unless no_op:  h = h + o(attn(rope(q(n)), rope(k(n)), v(n)))   n = rmsnorm(h) * input_layernorm
        KV heads = num_attention_heads // n_heads_in_group; query head j reads KV head j // n_heads_in_group
    FFN unless no_op:        h = h + down(silu(gate(n)) * up(n))             n = rmsnorm(h) * post_attention_layernorm

Rotary embeddings rotate the two halves of each head (neox style, as vLLM's Llama attention). Runs in
float64 and shares no code with layerfold.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


def ffn_width(ffn, hidden: int) -> int:
    if hasattr(ffn, "ffn_mult"):
        n = int(2 * ffn.ffn_mult * hidden / 3)
        return n if n % 256 == 0 else n + 256 - n % 256
    return ffn.intermediate_size


class DeciLMReference:
    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        self.cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
        self.w = {k: v.double() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}

    def _rms(self, x: Tensor, name: str) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * self.w[name]

    def _lin(self, x: Tensor, name: str) -> Tensor:
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def _rope(self, x: Tensor) -> Tensor:  # (H, T, hd)
        hd, T = x.shape[-1], x.shape[-2]
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    def _attention(self, x: Tensor, i: int, group: int) -> Tensor:
        c, p = self.cfg, f"model.layers.{i}.self_attn."
        T, H, hd = x.shape[0], c.num_attention_heads, c.head_dim
        q = self._lin(x, p + "q_proj").view(T, H, hd).transpose(0, 1)
        k = self._lin(x, p + "k_proj").view(T, H // group, hd).transpose(0, 1)
        v = self._lin(x, p + "v_proj").view(T, H // group, hd).transpose(0, 1)
        q, k = self._rope(q), self._rope(k)
        k, v = k[torch.arange(H) // group], v[torch.arange(H) // group]  # query head j reads KV head j // group
        s = q @ k.transpose(1, 2) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H * hd)
        return self._lin(y, p + "o_proj")

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """ids (T,) -> logits (T, V) in float64."""
        c = self.cfg
        h = self.w["model.embed_tokens.weight"][ids]
        for i, b in enumerate(c.block_configs):
            p = f"model.layers.{i}."
            if not b.attention.no_op:
                h = h + self._attention(self._rms(h, p + "input_layernorm.weight"), i, b.attention.n_heads_in_group)
            if not b.ffn.no_op:
                width = ffn_width(b.ffn, c.hidden_size)
                assert self.w[p + "mlp.gate_proj.weight"].shape[0] == width, "weights do not match the config width"
                n = self._rms(h, p + "post_attention_layernorm.weight")
                h = h + self._lin(torch.nn.functional.silu(self._lin(n, p + "mlp.gate_proj")) *
                                  self._lin(n, p + "mlp.up_proj"), p + "mlp.down_proj")
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"]) if not c.tie_word_embeddings \
            else self.w["model.embed_tokens.weight"]
        return self._rms(h, "model.norm.weight") @ head.T
