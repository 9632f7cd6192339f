"""What each GGUF architecture layerfold imports holds: the archs, their tensors, their refusals and their config.

llama.cpp names an architecture in ``general.architecture`` and keeps its settings under ``{arch}.*``. Imported:
llama (Llama, Mistral, SmolLM, TinyLlama), qwen2 (q/k/v biases), qwen3 (q/k norms) and phi3 (Phi-3, Phi-4: q/k/v
fused in ``attn_qkv``, gate and up in ``ffn_up``, split by core.gguf_weights.FUSED; rotary on halves as in qwen2,
so no row permutation). A phi3 file's longrope (the ``rope_factors_long`` / ``rope_factors_short`` tensors and
``rope.scaling.attn_factor`` that llama.cpp's converter writes for Phi-3-*-128k and Phi-3.5-mini) is read by
core.gguf_rope.gguf_longrope; a phi3 file whose rotary layerfold cannot compute is refused here, before anything is
converted: one factor tensor without the other, an attention factor without them, a rope.scaling.type, a
``rope.dimension_count`` that is not an even number up to the head size. Below the head size it is partial rotary
(Phi-4-mini: 96 of 128), which llama.cpp's phi3 graph computes as transformers' Phi3 does (halves of the first dims):
the config gets its ``partial_rotary_factor`` (transformers' GGUF reader drops the key) and the q/k rows are
permuted as from an HF directory (core.partial_rotary, core.gguf_weights._layout).

Longrope's switch: llama.cpp picks the long factors for every position when the context it is given (n_ctx per
sequence) exceeds the original one, the short ones otherwise, whatever the sequence's length; layerfold follows
transformers (the long factors once a sequence is longer than the original context: core.model.rope_tables), so
the two agree on sequences that fall on the same side as llama.cpp's n_ctx.

Sliding window: llama.cpp's phi3 converter writes the HF config's window (``phi3.attention.sliding_window``; 0 for
none, as for Phi-4). transformers' Phi3 applies it to every layer, and so does layerfold for Phi-3 from an HF
directory, so a phi3 file converts with it. llama.cpp (warning "Phi SWA is currently disabled", through
llama-cpp-python 0.3.36) and transformers' GGUF reader drop it: past the window their logits differ.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from layerfold.core.gguf_weights import FUSED

ARCHS = ("llama", "qwen2", "qwen3", "phi3")  # llama.cpp's names of the architectures imported
FAMILIES = "Llama, Mistral, SmolLM, TinyLlama: llama; Qwen2 / 2.5: qwen2; Qwen3: qwen3; Phi-3, Phi-4: phi3"
LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # llama.cpp's phi3 longrope tensors
OPTIONAL = ("rope_freqs.weight",)  # tensors a file may hold besides its weights (rope_freqs: core.gguf_rope)


def optional_tensors(arch: str, rot: int) -> dict[str, tuple[int, ...] | None]:
    """Tensors a file of ``arch`` may hold besides its weights, with their shapes (None: checked where read);
    ``rot``: the rotary dims of a head (longrope has a factor per pair of them)."""
    return {**dict.fromkeys(OPTIONAL), **(dict.fromkeys(LONGROPE, (rot // 2,)) if arch == "phi3" else {})}


def check_arch(path: Path, h: Any) -> None:
    """Refuse, naming the key or tensor and the fix, a file whose architecture (``h``: a gguf_input.Header) or
    arch-specific settings layerfold does not compute exactly."""
    arch = h.arch
    if arch == "deci":
        raise ValueError(
            f"{path}: a GGUF of architecture 'deci' (DeciLM / Nemotron-NAS: layers of different shapes, as `layerfold "
            "export --format gguf` writes a pruned model whose layers differ), which layerfold does not import from "
            "GGUF. Fix: load the layerfold checkpoint the file was exported from, or a DeciLM HF directory "
            "(`layerfold export --format decilm` writes one that layerfold loads)")
    if arch not in ARCHS:
        raise ValueError(
            f"{path}: a GGUF of architecture {arch!r}, which layerfold does not import: it imports GGUF files of "
            f"architecture {', '.join(ARCHS)} ({FAMILIES}). Fix: use a model of one of these families, or open an "
            "issue for the architecture")
    if arch == "phi3":
        _check_phi3(path, h)


def _check_phi3(path: Path, h: Any) -> None:
    found = [t for t in LONGROPE if t in h.tensors]
    attn = h.get("phi3.rope.scaling.attn_factor")
    kind = h.get("phi3.rope.scaling.type")
    if len(found) == 1 or (attn is not None and not found) or kind not in (None, "none"):
        what = (f"{found[0]} without {next(t for t in LONGROPE if t not in found)}" if len(found) == 1 else
                f"phi3.rope.scaling.type={kind!r}" if kind not in (None, "none") else
                "phi3.rope.scaling.attn_factor without the rope_factors_long / rope_factors_short tensors")
        raise ValueError(f"{path}: a Phi-3 GGUF with rope scaling layerfold does not read ({what}; llama.cpp's "
                         "converter writes longrope as both factor tensors and the attention factor). Fix: download "
                         "the file again, or convert the model from its HF directory")
    if attn is not None and (isinstance(attn, bool) or not isinstance(attn, (int, float)) or not attn > 0 or
                             attn == float("inf")):
        raise ValueError(f"{path}: phi3.rope.scaling.attn_factor is {attn!r}, not a finite number > 0. Fix: download "
                         "the file again, or convert the model from its HF directory")
    window = h.get("phi3.attention.sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"{path}: phi3.attention.sliding_window is {window!r}, not a whole number >= 0 (0: none). "
                         "Fix: download the file again, or convert the model from its HF directory")
    d, heads, dims = (h.get(f"phi3.{k}") for k in ("embedding_length", "attention.head_count", "rope.dimension_count"))
    hd = h.get("phi3.attention.key_length") or (d // heads if isinstance(d, int) and isinstance(heads, int) and
                                                heads > 0 else None)
    if isinstance(dims, int) and isinstance(hd, int) and dims != hd and not (0 < dims < hd and dims % 2 == 0):
        raise ValueError(f"{path}: phi3.rope.dimension_count is {dims!r}, not an even number in 2..{hd} (the head "
                         "size): rotary turns dims in pairs. Fix: download the file again, or convert the model from "
                         "its HF directory")


def expected_tensors(arch: str, s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The tensors (torch shapes) of a GGUF file of ``arch`` with sizes ``s``; output.weight is optional (tied)."""
    d, q, kv, f = s["d"], s["heads"] * s["hd"], s["kv"] * s["hd"], s["ffn"]
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (s["vocab"], d), "output_norm.weight": (d,)}
    for i in range(s["layers"]):
        b = f"blk.{i}."
        fused = "ATTN_QKV" in FUSED.get(arch, {})  # (phi3: q, k, v rows in one tensor; gate, up rows in one)
        out[b + "attn_norm.weight"] = (d,)
        out.update({b + "attn_qkv.weight": (q + 2 * kv, d)} if fused else
                   {b + "attn_q.weight": (q, d), b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d)})
        out.update({b + "attn_output.weight": (d, q), b + "ffn_norm.weight": (d,)})
        out.update({b + "ffn_up.weight": (2 * f, d)} if fused else
                   {b + "ffn_gate.weight": (f, d), b + "ffn_up.weight": (f, d)})
        out[b + "ffn_down.weight"] = (d, f)
        if arch == "qwen2":
            out.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if arch == "qwen3":
            out.update({b + "attn_q_norm.weight": (s["hd"],), b + "attn_k_norm.weight": (s["hd"],)})
    return out


def file_config(cfg: Any, h: Any, s: dict[str, int]) -> Any:
    """transformers' config of the file with the sizes and window llama.cpp's converter wrote into it: the head size
    (key_length: Qwen3's reader assumes 128), the vocabulary (the embedding's rows), the sliding window of a phi3 file
    (the reader drops it; module docstring) and none for llama and qwen (their llama.cpp graphs attend to every
    position), and for a llama file named "mistral" (which transformers takes for a Mistral it then cannot map), a
    Llama."""
    if h.arch == "llama" and cfg.model_type != "llama":
        from transformers import LlamaConfig

        keep = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
        cfg = LlamaConfig.from_dict(keep)
    cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size = s["hd"], s["kv"], s["vocab"]
    window = h.get("phi3.attention.sliding_window") if h.arch == "phi3" else None  # (checked: check_arch)
    if getattr(cfg, "sliding_window", None) is not None or window:
        cfg.sliding_window = window or None
    if getattr(cfg, "use_sliding_window", False):
        cfg.use_sliding_window = False
    dims = h.get("phi3.rope.dimension_count") if h.arch == "phi3" else None  # (checked: check_arch)
    if isinstance(dims, int) and dims < s["hd"]:  # partial rotary (Phi-4-mini), which transformers' reader drops
        factor = dims / s["hd"]
        if int(s["hd"] * factor) != dims:  # (core.partial_rotary counts int(head_dim * factor) dims)
            factor = math.nextafter(factor, 2.0)
        cfg.partial_rotary_factor = factor
        for k in ("rope_parameters", "rope_scaling"):
            if isinstance(getattr(cfg, k, None), dict):
                getattr(cfg, k)["partial_rotary_factor"] = factor
    return cfg


__all__ = ["ARCHS", "FAMILIES", "LONGROPE", "OPTIONAL", "check_arch", "expected_tensors", "file_config",
           "optional_tensors"]
