"""Tiny random-weight HF models of each supported family, shared by parity and export tests."""

from __future__ import annotations

import torch

import layerfold
from layerfold.core.arch import spec_from_hf_config, state_from_hf


def tiny_hf(family: str, *, seed: int = 0, tie: bool = False, **over):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                rope_theta=10000.0)
    if family == "llama":
        cfg = LlamaConfig(**base, **over)
    elif family == "llama3":
        cfg = LlamaConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                          **over)
    elif family == "mistral":
        cfg = MistralConfig(**base, sliding_window=8, head_dim=16, **over)
    elif family == "qwen2":
        cfg = Qwen2Config(**base, **over)
    elif family == "qwen3":
        cfg = Qwen3Config(**base, head_dim=24, **over)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms at 1.0 hide mapping mistakes: randomise them
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return hf


def to_layerfold(hf) -> layerfold.Model:
    spec = spec_from_hf_config(hf.config)
    state = state_from_hf({k: v.clone() for k, v in hf.state_dict().items()}, spec)
    return layerfold.build_model(spec, state).eval()
