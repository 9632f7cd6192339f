"""``--format hf``: a vanilla Hugging Face transformers model directory (no custom code).

Only a model whose layers are all the same plain decoder layer fits an HF config, which holds one shape
for every layer: depth pruning by dropping or merging, Streamline with ``--replacement decoder``, and
constant-width global-basis SliceGPT (``--basis global --slice-ends``). The class is the one whose attention
computes the model's exactly (``layerfold.interop.formats.hf_arch``: a Llama with q/k/v biases goes out as a
Qwen2, one with a sliding window as a Mistral, a Phi-3 as Phi3 where that class computes it: fused weights,
partial rotary, longrope, ``layerfold.interop.phi3_hf``); config.json comes from
``layerfold.core.arch.hf_config_from_spec`` and the weights are renamed by the one key map there; the
tokenizer is written so that every supported transformers version (>= 4.56) loads it
(``layerfold.core.checkpoint.save_tokenizer``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from layerfold.core.arch import hf_config_from_spec, state_to_hf
from layerfold.core.checkpoint import save_tokenizer
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
from layerfold.interop.formats import check_format, hf_arch
from layerfold.interop.phi3_hf import phi3_config, phi3_state


def export_hf(src: str | Path | Source, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
              allow_nonfinite: bool = False) -> dict[str, Any]:
    """Write ``src`` as an HF model directory that ``AutoModelForCausalLM.from_pretrained(out)`` loads.

    Returns {"out", "format", "architecture", "layers", "params", "dtype", "tokenizer"}."""
    s = src if isinstance(src, Source) else read_source(src)
    out = check_export_out(out, [s.name, s.path], overwrite)
    check_format(s.spec, "hf", f"{s.name}")
    dt = export_dtype(s.state, dtype)
    check_weights(s, dt, allow_nonfinite)
    spec = replace(s.spec, arch=hf_arch(s.spec))
    if spec.arch == "phi3":  # transformers' own Phi3 class: fused weights, partial rotary, longrope (interop.phi3_hf)
        hf_cfg, tensors = phi3_config(spec), cast(phi3_state(s.state, spec), dt)
    else:
        hf_cfg = hf_config_from_spec(spec)
        tensors = cast(state_to_hf(hf_state(s.state, spec), spec), dt)
    hf_cfg["torch_dtype"] = dtype_name(dt)
    tokenizer = s.tokenizer()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        write_generation_config(tmp, s)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_provenance(tmp, s, "hf")
    return {"out": str(out), "format": "hf", "architecture": hf_cfg["architectures"][0], "layers": s.spec.n_layers,
            "params": sum(int(v.numel()) for v in tensors.values()), "dtype": hf_cfg["torch_dtype"],
            "tokenizer": tokenizer is not None}


def hf_state(state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]:
    """``state`` with what the target class holds but the model lacks, as zeros: Qwen2's q/k/v biases."""
    if spec.arch != "qwen2" or spec.qkv_bias:
        return state
    out = dict(state)
    for i in range(spec.n_layers):
        w = {p: state[f"layers.{i}.attn.{p}.weight"] for p in "qkv"}
        out.update({f"layers.{i}.attn.{p}.bias": w[p].new_zeros(w[p].shape[0]) for p in "qkv"})
    return out


def write_generation_config(out: Path, s: Source) -> None:
    gen = {k: v for k, v in (("bos_token_id", s.spec.bos_token_id), ("eos_token_id", eos_value(s.spec)))
           if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


__all__ = ["export_hf", "hf_state", "write_generation_config"]
