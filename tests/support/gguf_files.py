"""GGUF files for tests, made offline: a copy of a GGUF file with its 2-D weights quantised (Q8_0, Q4_0, ...), a
small file of arch llama with given metadata keys (rope settings), and a Phi-3 file as llama.cpp writes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def quantized_copy(src: Path, dst: Path, qtype: str = "Q8_0") -> Path:
    """``src`` with every 2-D float tensor whose rows fit the quantisation's blocks stored as ``qtype``, the rest
    (norm gains, odd widths) as they are; metadata copied key by key."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    q = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        arr = np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if arr.ndim == 2 and shape[-1] % block == 0 and t.name != "rope_freqs.weight":
            w.add_tensor(t.name, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def keys_file(path: Path, keys: dict[str, Any], tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file of arch llama holding ``keys`` (full names; str, int as uint32, float as float32) and
    ``tensors`` (default: one small token_embd.weight)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in keys.items():
        (w.add_string if isinstance(v, str) else w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    for name, arr in (tensors or {"token_embd.weight": np.zeros((2, 2), dtype=np.float32)}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# a SentencePiece ("llama") vocabulary of 300: <unk> <s> </s>, 256 byte tokens, pieces by score, then Phi-3's chat
# tokens (llama.cpp looks <|endoftext|> up in a file whose name says phi3)
PHI3_SPECIAL = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
SPM_PIECES = ["\u2581", "\u2581the", "\u2581capital", "\u2581of", "\u2581France", "\u2581is", "\u2581Paris", ".",
              "\u2581hello", "\u2581world", "he", "ll", "o", "\u2581t", "\u2581c", "ap", "it", "al", "\u2581F", "ra",
              "nce", "\u2581P", "ar", "is", "e", "a", "r", "l", "t", "h", "c", "p", "i", "s", "n", "F", "P"]


def phi3_file(path: Path, hf: Any, *, keys: dict[str, Any] | None = None, tensors: dict[str, np.ndarray] | None = None,
              drop: tuple[str, ...] = ()) -> Path:
    """A GGUF file of the transformers Phi3ForCausalLM ``hf`` (vocabulary 300) as llama.cpp's convert_hf_to_gguf.py
    writes one: its Phi3MiniModel keys, tensors named by gguf's map for arch phi3 (qkv_proj as attn_qkv, gate_up_proj
    as ffn_up, rows as they are: no permutation), float32, with a SentencePiece vocabulary. ``keys``: full key name
    -> value (str; int as uint32; float as float32; None drops the key); ``tensors``: more tensors, or replacements;
    ``drop``: tensors left out."""
    import gguf

    c = hf.config
    assert c.vocab_size == 300, "the vocabulary written has 300 tokens"
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    hd = c.hidden_size // c.num_attention_heads
    meta: dict[str, Any] = {
        "general.name": "Phi3 tiny", "phi3.context_length": c.max_position_embeddings,
        "phi3.rope.scaling.original_context_length": c.original_max_position_embeddings or c.max_position_embeddings,
        "phi3.embedding_length": c.hidden_size, "phi3.feed_forward_length": c.intermediate_size,
        "phi3.block_count": c.num_hidden_layers, "phi3.attention.head_count": c.num_attention_heads,
        "phi3.attention.head_count_kv": c.num_key_value_heads, "phi3.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        "phi3.rope.dimension_count": int(hd * getattr(c, "partial_rotary_factor", 1.0)),
        "phi3.rope.freq_base": float(rope["rope_theta"]), "general.file_type": 0,
        "phi3.attention.sliding_window": c.sliding_window or 0, **(keys or {})}
    w = gguf.GGUFWriter(str(path), "phi3")
    for k, v in meta.items():
        if v is not None:
            (w.add_string if isinstance(v, str) else w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + PHI3_SPECIAL
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0] * len(PHI3_SPECIAL))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3] * len(PHI3_SPECIAL))
    w.add_bos_token_id(1)
    w.add_eos_token_id(toks.index("<|endoftext|>"))
    w.add_unk_token_id(0)
    w.add_pad_token_id(toks.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, c.num_hidden_layers)
    out = {names.get_name(k, try_suffixes=(".weight", ".bias")): v.detach().float().numpy()
           for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    if c.tie_word_embeddings:
        out.pop("output.weight", None)
    for name, arr in {**out, **(tensors or {})}.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
