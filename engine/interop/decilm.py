"""``--format decilm``: the DeciLM / Nemotron-NAS ``block_configs`` checkpoint that vLLM serves.

``vllm serve OUT --trust-remote-code`` runs it as ``DeciLMForCausalLM``. Per layer ``i`` the config says::

    block_configs[i].attention = {"no_op": bool, "n_heads_in_group": H / kv_i | null, "replace_with_linear": false}
    block_configs[i].ffn       = {"no_op": bool, "intermediate_size": f_i | null [, "ffn_mult": m_i]}

and the layer computes (vLLM's DeciLMDecoderLayer)::

    h = h + attn(rmsnorm(h; input_layernorm))          unless attention.no_op
    h = h + mlp(rmsnorm(h; post_attention_layernorm))  unless ffn.no_op

which is layerfold's Block for every layer without shortcut matrices at the embedding width: an
LLM-Streamline MLP block is attention no-op, an attention-only layer is FFN no-op. Hidden size, query heads
and head size are one value for the whole model (``layerfold.interop.formats.decilm_problem``). ``ffn_mult`` is
written only when vLLM's formula ``round_up(int(2 * m * hidden / 3), 256)`` gives the width back exactly; it
is what NVIDIA's own config files and llama.cpp's converter read. Weights keep the Llama names (HF layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.arch import ffn_mult_width, hf_name_to_layerfold, rope_scaling, spec_from_hf_config, state_to_hf
from layerfold.core.checkpoint import open_weights, save_tokenizer
from layerfold.core.dtypes import dtype_name
from layerfold.core.paths import atomic_dir
from layerfold.core.spec import ModelSpec
from layerfold.interop.common import (
    Source,
    cast,
    check_export_out,
    check_weights,
    eos_value,
    export_dtype,
    read_source,
    write_provenance,
)
from layerfold.interop.decilm_config import AUTO_MAP, CONFIG_FILE, SOURCE
from layerfold.interop.formats import check_format
from layerfold.interop.hf import write_generation_config

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"


def exact_ffn_mult(width: int, hidden: int) -> float | None:
    """An ``ffn_mult`` that gives ``width`` back exactly, or None (then only intermediate_size is written)."""
    if width % 256:
        return None
    m = round(1.5 * width / hidden, 6)
    return m if ffn_mult_width(m, hidden) == width else None


def block_configs(spec: ModelSpec) -> list[dict[str, Any]]:
    heads = next(l.n_heads for l in spec.layers if l.has_attn)
    out = []
    for l in spec.layers:
        attn = {"no_op": not l.has_attn, "replace_with_linear": False,
                "n_heads_in_group": heads // l.n_kv_heads if l.has_attn else None}
        ffn: dict[str, Any] = {"no_op": not l.has_mlp, "replace_with_linear": False,
                               "intermediate_size": l.d_ffn if l.has_mlp else None}
        mult = exact_ffn_mult(l.d_ffn, spec.d_model) if l.has_mlp else None
        if mult is not None:
            ffn["ffn_mult"] = mult
        out.append({"attention": attn, "ffn": ffn})
    return out


def decilm_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of the export (check_format(spec, "decilm") first)."""
    first = next(l for l in spec.layers if l.has_attn)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": first.n_heads, "num_key_value_heads": first.n_kv_heads, "head_dim": first.head_dim,
        "intermediate_size": max((l.d_ffn for l in spec.layers if l.has_mlp), default=1), "hidden_act": "silu",
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta,
        "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": spec.tie_embeddings, "bos_token_id": spec.bos_token_id, "eos_token_id": eos_value(spec),
        "block_configs": block_configs(spec),
    }
    if spec.qkv_bias:  # vLLM: qkv_bias sets the q/k/v biases, attention_bias (false) the o_proj bias
        cfg["qkv_bias"] = True
    if spec.rope_type != "default":
        cfg["rope_scaling"] = rope_scaling(spec)
    return cfg


def export_decilm(src: str | Path | Source, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
                  allow_nonfinite: bool = False) -> dict[str, Any]:
    """Write ``src`` as a DeciLM (Nemotron-NAS) directory for vLLM; returns what was written."""
    s = src if isinstance(src, Source) else read_source(src)
    out = check_export_out(out, [s.name, s.path], overwrite)
    check_format(s.spec, "decilm", s.name)
    cfg = decilm_config(s.spec)
    dt = export_dtype(s.state, dtype)
    check_weights(s, dt, allow_nonfinite)
    cfg["torch_dtype"] = dtype_name(dt)
    tensors = cast(state_to_hf(s.state, s.spec), dt)
    tokenizer = s.tokenizer()
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / CONFIG_FILE).write_text(SOURCE)
        write_generation_config(tmp, s)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_provenance(tmp, s, "decilm")
    blocks = cfg["block_configs"]
    return {"out": str(out), "format": "decilm", "architecture": ARCHITECTURE, "layers": s.spec.n_layers,
            "params": sum(int(v.numel()) for v in tensors.values()), "dtype": cfg["torch_dtype"],
            "tokenizer": tokenizer is not None,
            "attention_no_op": [i for i, b in enumerate(blocks) if b["attention"]["no_op"]],
            "ffn_no_op": [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]],
            "serve": f"vllm serve {out} --trust-remote-code"}


def read_decilm(path: str | Path) -> tuple[ModelSpec, dict[str, Tensor]]:
    """The layerfold (spec, state) of a decilm export, read from its config.json and safetensors
    (``export --verify`` runs it against the source; tests check the format against an independent reading)."""
    p = Path(path)
    spec = spec_from_hf_config(json.loads((p / "config.json").read_text()), str(p))
    state = {}
    for name, t in open_weights(p / "model.safetensors").items():
        lf = hf_name_to_layerfold(name)
        if lf is None:
            raise ValueError(f"{p}: tensor {name!r} has no layerfold name. Fix: re-export the model")
        state[lf] = t.to(torch.float32)
    return spec, state


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "block_configs", "decilm_config", "exact_ffn_mult", "export_decilm",
           "ffn_mult_width", "read_decilm"]
