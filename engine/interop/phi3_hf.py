"""``--format hf`` of a Phi-3 / Phi-4 model (arch ``phi3``) as transformers' own ``Phi3ForCausalLM``.

Every uniform ``phi3`` spec that the Phi3 class computes exactly goes out as Phi3 (``phi3_problem`` None): the source
family's class, so transformers and vLLM run their Phi3 code on it: its partial rotary (Phi-4-mini), its longrope
(Phi-3-*-128k, Phi-3.5: ``Phi3ForCausalLM.generate`` recomputes the cache when a sequence crosses the original
context, transformers 5) and its sliding window (every layer). The weights go out fused as Phi3 holds them:
``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj`` (gate rows, then up), q/k rows back in HF's layout
(``core.partial_rotary.permute_state(..., inverse=True)``).

What the Phi3 class cannot say, and then the spec goes out as before (Llama / Mistral, unfused;
``core.arch.UNFUSED_AS``), or, with partial rotary, is refused (``interop.formats.PARTIAL_NOT``):

- longrope with factor lists that transformers' Phi3Config would reject: it checks their length against
  hidden_size // num_attention_heads, not head_dim (a head-pruned or SliceGPT-narrowed model);
- longrope whose attention factor is not the one derived from max_position_embeddings / original context:
  transformers 4.56's Phi3Config accepts only ``type``, ``short_factor`` and ``long_factor`` in rope_scaling.

The config is written once for both transformers versions: rope_theta, partial_rotary_factor and
original_max_position_embeddings at the top level (4.56 reads only them there; 5 copies them into
rope_parameters), rope_scaling as ``{"type": "longrope", "short_factor", "long_factor"}`` (4.56 requires exactly
these three keys; 5 reads it as rope_parameters).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from layerfold.core.arch import FUSED, hf_base_config, state_to_hf
from layerfold.core.partial_rotary import permute_state
from layerfold.core.spec import ModelSpec


def longrope_attention_factor(max_pos: int, orig: int) -> float:
    """transformers' default longrope attention factor (what Phi3 computes when the config gives none)."""
    s = max_pos / orig
    return math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0


def phi3_problem(spec: ModelSpec) -> str | None:
    """None when ``Phi3ForCausalLM`` computes ``spec`` exactly (a uniform phi3 spec it can be configured for), else
    why not (then the export is what hf_arch says otherwise)."""
    if spec.arch != "phi3":
        return f"it is a {spec.arch} model, not a Phi-3 one"
    if not spec.uniform:
        return "its layers are not all alike"
    if spec.qkv_bias or spec.qk_norm:
        return "its attention has q/k/v biases or q/k norms, which transformers' Phi3 has not"
    if spec.rope_type not in ("default", "longrope"):
        return f"its {spec.rope_type!r} rope scaling, which transformers' Phi3Config refuses (default or longrope)"
    l = spec.layers[0]
    rot = spec.rotary_dim or l.head_dim
    if int(l.head_dim * (rot / l.head_dim)) != rot:  # (transformers: int(head_dim * partial_rotary_factor))
        return f"its {rot} rotary dims of {l.head_dim} are not int(head_dim * {rot / l.head_dim!r}) in float arithmetic"
    if spec.rope_type != "longrope":
        return None
    checked = int(spec.d_model // l.n_heads * rot / l.head_dim) // 2
    if checked != rot // 2:
        return (f"its longrope factors ({rot // 2} per head) would be refused by transformers' Phi3Config, which "
                f"expects {checked} (it derives the head size from hidden_size {spec.d_model} / "
                f"{l.n_heads} heads, not head_dim {l.head_dim})")
    want = longrope_attention_factor(spec.max_position, spec.rope_original_max_pos)
    if abs(spec.rope_attention_factor - want) > 1e-9 * want:
        return (f"its longrope attention factor {spec.rope_attention_factor:g} is not the one transformers' Phi3 "
                f"derives ({want:g}), and transformers 4.x's Phi3Config cannot hold one")
    return None


def phi3_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of ``Phi3ForCausalLM`` for ``spec`` (after phi3_problem returned None)."""
    l = spec.layers[0]
    cfg = {**hf_base_config(spec, "phi3"),
           "original_max_position_embeddings": spec.rope_original_max_pos if spec.rope_type == "longrope" else
           spec.max_position,
           "partial_rotary_factor": spec.rotary_dim / l.head_dim if spec.rotary_dim else 1.0,
           "sliding_window": spec.sliding_window,
           "pad_token_id": None,  # (Phi3Config's default, 32000, lies beyond a smaller vocabulary)
           "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if spec.rope_type == "longrope":
        cfg["rope_scaling"] = {"type": "longrope", "short_factor": list(spec.rope_short_factor),
                               "long_factor": list(spec.rope_long_factor)}
    return cfg


def phi3_state(state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]:
    """``state`` (layerfold names) in Phi3's HF names: q/k rows un-permuted (partial rotary), q/k/v and gate/up
    fused (``core.arch.FUSED``), the rest renamed by the key map."""
    st = dict(permute_state(state, spec, inverse=True))
    out: dict[str, Tensor] = {}
    for i in range(spec.n_layers):
        for hf, parts in FUSED["phi3"].items():
            names = [f"layers.{i}.{lf}" for lf, _ in parts]
            out[hf.replace("{i}", str(i))] = torch.cat([st.pop(n) for n in names], dim=0).contiguous()
    return {**state_to_hf(st, spec), **out}


__all__ = ["longrope_attention_factor", "phi3_config", "phi3_problem", "phi3_state"]
