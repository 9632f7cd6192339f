"""Which export formats can carry a model: one place that reads a ModelSpec and says yes, or why not.

- ``hf``: plain transformers (Llama, Mistral, Qwen2, Qwen3, Phi3): every layer the same plain decoder layer at
  the embedding width (depth pruning by dropping or merging, constant-width global-basis SliceGPT), written as
  the class that computes its attention exactly (``hf_arch``: q/k/v biases, q/k norms, a sliding window).
- ``decilm``: the DeciLM / Nemotron-NAS ``block_configs`` config that vLLM serves (``DeciLMForCausalLM``):
  per layer, attention present or a no-op, its KV heads, the FFN present or a no-op and its width; one
  hidden size, one query-head count and one head size for every layer; no shortcut matrices.
- ``gguf``: llama.cpp. Arch ``llama`` for an ``hf``-uniform model (``qwen2`` with q/k/v biases, ``qwen3``
  with q/k norms), arch ``deci`` (per-layer head counts, KV-head counts and FFN lengths) for the rest of what
  ``decilm`` carries, except attention-only layers: llama.cpp's ``deci`` graph skips the residual add of a
  layer without FFN, so their attention would be lost. Rope: linear, Llama-3 (a ``rope_freqs`` tensor) and
  YaRN with HF's default knobs.

A uniform Phi-3 / Phi-4 spec goes to ``hf`` as transformers' own ``Phi3ForCausalLM`` (fused weights, partial rotary,
longrope; ``layerfold.interop.phi3_hf``) where that class computes it exactly, else unfused as Llama / Mistral.
longrope goes to ``hf`` only (transformers reads it in every class here; ``LONGROPE_NOT`` says why not the others).
Partial rotary (Phi-4-mini) goes to ``hf`` as Phi3 only (``PARTIAL_NOT`` for the rest): decilm and gguf refuse it.

Each ``*_problem`` returns None when the format carries the model, else the first reason it cannot.
"""

from __future__ import annotations

import math

from layerfold.core.arch import SUPPORTED, describe_nonuniform
from layerfold.core.spec import ModelSpec
from layerfold.interop.phi3_hf import phi3_problem

FORMATS = ("hf", "decilm", "gguf")


# the transformers classes an ``hf`` export may write, and what their attention has: q/k/v biases ("bias": Qwen2 always,
# written as zeros for a model without), q/k norms ("norm": Qwen3 always) and a sliding window over every layer
# ("window": Mistral; Qwen2/Qwen3 apply theirs only from max_window_layers on, so they are not used for one)
HF_CLASSES = {"llama": (), "mistral": ("window",), "qwen2": ("bias",), "qwen3": ("norm",)}


def _attention_features(spec: ModelSpec) -> set[str]:
    on = {"bias": spec.qkv_bias, "norm": spec.qk_norm, "window": spec.sliding_window is not None}
    return {f for f, v in on.items() if v}


def hf_arch(spec: ModelSpec) -> str | None:
    """The transformers model type an ``hf`` export of ``spec`` is written as: its own family when that class computes
    exactly its attention, else the first one that does (a Llama with q/k/v biases is a Qwen2, one with a sliding
    window a Mistral, a Qwen3 without q/k norms a Llama); a uniform Phi-3 is a Phi3 where that class computes it
    exactly (``interop.phi3_hf.phi3_problem``), else, its weights unfused, a Llama or a Mistral as
    ``layerfold.core.arch.UNFUSED_AS`` says; None when none does."""
    if phi3_problem(spec) is None:
        return "phi3"
    need = _attention_features(spec)

    def fits(cls: str) -> bool:
        has = set(HF_CLASSES[cls])
        return need <= has and ("norm" in has) == ("norm" in need)  # q/k norms cannot be switched off

    order = [spec.arch] if spec.arch in HF_CLASSES else []
    return next((c for c in order + list(HF_CLASSES) if fits(c)), None)


def _layer_problem(spec: ModelSpec) -> str | None:
    return None if spec.uniform else describe_nonuniform(spec)


def hf_problem(spec: ModelSpec) -> str | None:
    if spec.arch not in SUPPORTED:
        return f"its source architecture {spec.arch!r} has no transformers class here"
    if spec.rotary_dim and phi3_problem(spec) is not None:  # (only transformers' Phi3 rotates part of each head)
        why = _partial_problem(spec, "transformers Llama-family")
        return why if not spec.uniform else f"{why} (nor can transformers' Phi3 carry it: {phi3_problem(spec)})"
    why = _layer_problem(spec)
    if why is None and hf_arch(spec) is None:
        feats = {"bias": "q/k/v biases", "norm": "q/k norms", "window": "sliding-window attention"}
        why = (f"its attention combines {' and '.join(feats[f] for f in sorted(_attention_features(spec)))}, which no "
               "transformers class here computes together (Llama: none of them; Mistral: a sliding window; Qwen2: "
               "q/k/v biases; Qwen3: q/k norms)")
    return why


# longrope (Phi-3-*-128k, Phi-3.5) in formats whose readers switch its factors otherwise than transformers (per
# sequence: core.model.rope_tables): vLLM for a whole batch, llama.cpp by its context size (core.gguf_arch)
LONGROPE_NOT = {
    "decilm": "its longrope rotary (Phi-3-*-128k, Phi-3.5), whose factors vLLM switches per batch, not per sequence "
              "as transformers and layerfold do",
    "gguf": "its longrope rotary (Phi-3-*-128k, Phi-3.5), which this GGUF export does not write: llama.cpp switches "
            "its factors by the context size it is given, not per sequence as transformers and layerfold do",
}


# partial rotary (Phi-4-mini): the model holds q/k rows permuted into whole-head rotary's layout
# (core.partial_rotary); only the hf export as Phi3 (interop.phi3_hf) un-permutes them for a class that rotates part
# of each head
PARTIAL_NOT = ("its partial rotary (rotary_dim {rot} of {hd}-dim heads, Phi-4-mini's partial_rotary_factor), which "
               "this export does not write: layerfold holds the q/k weights permuted for it, and the {fmt} reader "
               "would rotate whole heads")


def _partial_problem(spec: ModelSpec, fmt: str) -> str | None:
    if not spec.rotary_dim:
        return None
    hd = next((l.head_dim for l in spec.layers if l.has_attn), 0)
    return PARTIAL_NOT.format(rot=spec.rotary_dim, hd=hd, fmt=fmt)


def decilm_problem(spec: ModelSpec) -> str | None:
    if spec.rotary_dim:
        return _partial_problem(spec, "vLLM DeciLM")
    if spec.rope_type == "longrope":
        return LONGROPE_NOT["decilm"]
    why = _block_problem(spec)
    if why is None and not spec.layers[0].has_attn:
        return ("layer 0 has no attention: vLLM's DeciLM layer starts its residual in the first attention "
                "block and fails on a first layer without one")
    return why


def _block_problem(spec: ModelSpec) -> str | None:
    """What neither block_configs (vLLM) nor llama.cpp's deci arch can say."""
    if spec.qk_norm:
        return "its attention normalises q and k (Qwen3), which block_configs cannot say"
    if spec.sliding_window is not None:
        return "it uses sliding-window attention, which block_configs cannot say"
    attn = [l for l in spec.layers if l.has_attn]
    if not attn:
        return "no layer has attention (vLLM sizes its KV cache from the first attention layer)"
    for i, l in enumerate(spec.layers):
        if l.attn_shortcut or l.mlp_shortcut:
            return f"layer {i} carries SliceGPT shortcut matrices (per-layer residual bases)"
        if not l.d_in == l.d_mid == l.d_out == spec.d_model:
            return f"layer {i} changes the residual width ({l.d_in} -> {l.d_out}, embeddings {spec.d_model})"
        if l.has_attn and (l.n_heads, l.head_dim) != (attn[0].n_heads, attn[0].head_dim):
            return (f"layer {i} has {l.n_heads} query heads of {l.head_dim}, the first attention layer "
                    f"{attn[0].n_heads} of {attn[0].head_dim}: block_configs holds one query-head count and size")
    return None


# YaRN as llama.cpp computes it from the GGUF keys it reads (type, factor, original context): HF's defaults
YARN_DEFAULTS = {"rope_beta_fast": 32.0, "rope_beta_slow": 1.0, "rope_truncate": True}


def gguf_problem(spec: ModelSpec) -> str | None:
    if spec.rotary_dim:
        return _partial_problem(spec, "llama.cpp llama/deci")
    if spec.rope_type == "longrope":
        return LONGROPE_NOT["gguf"]
    if spec.qkv_bias and spec.qk_norm:
        return "its attention has both q/k/v biases and q/k norms, which no llama.cpp arch computes together"
    if (spec.qkv_bias or spec.qk_norm) and not spec.uniform:
        return ("its attention has q/k/v biases or q/k norms (Qwen2/Qwen3), which llama.cpp's qwen2/qwen3 archs "
                "carry only for layers all alike (the deci arch, for per-layer shapes, has neither)")
    if spec.sliding_window is not None:
        return "it uses sliding-window attention, which the llama and deci GGUF archs do not apply"
    if (spec.qkv_bias or spec.qk_norm) and spec.rope_type == "llama3":
        return "its Llama-3 rope scaling, which llama.cpp's qwen2/qwen3 archs do not apply (no rope_freqs tensor)"
    if spec.rope_type not in ("default", "linear", "llama3", "yarn"):
        return f"its rotary embedding uses {spec.rope_type!r} scaling, which this GGUF export does not write"
    if spec.rope_type == "yarn":
        odd = [k for k, v in YARN_DEFAULTS.items() if getattr(spec, k) != v]
        default_attn = 0.1 * math.log(spec.rope_factor) + 1 if spec.rope_factor > 1 else 1.0
        if abs(spec.rope_attention_factor - default_attn) > 1e-6:
            odd.append("rope_attention_factor")
        if odd:
            return (f"its YaRN scaling sets {', '.join(odd)} away from the defaults, which the GGUF keys llama.cpp "
                    "reads (type, factor, original context) cannot say")
    if spec.uniform:
        return None
    why = _block_problem(spec)
    if why is not None:
        return why
    for i, l in enumerate(spec.layers):
        if not l.has_mlp:
            return (f"layer {i} is attention-only: llama.cpp's deci graph skips the residual add of a layer "
                    "without FFN, so its attention output would be dropped")
    return None


PROBLEMS = {"hf": hf_problem, "decilm": decilm_problem, "gguf": gguf_problem}


def carriers(spec: ModelSpec) -> list[str]:
    """The export formats that can carry ``spec``, in FORMATS order."""
    return [f for f in FORMATS if PROBLEMS[f](spec) is None]


def gguf_arch(spec: ModelSpec) -> str:
    """'qwen2' (q/k/v biases) or 'qwen3' (q/k norms) for a uniform model with them, else 'llama' for a uniform
    model and 'deci' for per-layer shapes (call after gguf_problem returned None)."""
    if spec.qkv_bias:
        return "qwen2"
    if spec.qk_norm:
        return "qwen3"
    return "llama" if spec.uniform else "deci"


def check_format(spec: ModelSpec, fmt: str, src: str = "the model") -> None:
    """Raise ValueError naming why ``fmt`` cannot carry ``spec`` and which formats can."""
    if fmt not in PROBLEMS:
        raise ValueError(f"unknown export format {fmt!r}. Fix: use one of {', '.join(FORMATS)}")
    why = PROBLEMS[fmt](spec)
    if why is None:
        return
    others = [f for f in carriers(spec) if f != fmt]
    if others:
        fix = (f"export it with --format {others[0]}" + (f" (or {', '.join(others[1:])})" if others[1:] else "")
               + "; formats that carry this model: " + ", ".join(others))
    else:
        fix = ("no export format carries it: run it with layerfold itself (`layerfold serve`, `layerfold generate`, "
               "`layerfold lm-eval`)")
        if _layer_problem(spec) is not None:
            fix += (", or prune with a method that keeps layers alike (depth methods; `--method streamline "
                    "--replacement decoder`; slicegpt `--basis global --slice-ends`)")
    if fmt == "hf" and "MLP replacement block" in why:
        fix += "; for a plain HF model, prune with `--method streamline --replacement decoder`"
    raise ValueError(f"{src} cannot be exported as {fmt}: {why}. Fix: {fix}")


__all__ = ["FORMATS", "HF_CLASSES", "carriers", "check_format", "decilm_problem", "gguf_arch", "gguf_problem",
           "hf_arch", "hf_problem"]
