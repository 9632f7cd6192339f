"""``--format gguf``: one GGUF file for llama.cpp, written with the ``gguf`` package.

Uniform models go out as arch ``llama`` (``qwen2`` with q/k/v biases, ``qwen3`` with q/k norms, as llama.cpp's
converter writes Qwen models); models with per-layer shapes as arch ``deci`` (llama.cpp's
DeciLM / Nemotron-NAS graph), whose ``attention.head_count``, ``attention.head_count_kv`` and
``feed_forward_length`` are per-layer arrays: 0 heads = attention-free layer (an LLM-Streamline MLP block).
Tensors are f32, f16 or bf16 (norm gains always f32, as llama.cpp's converter writes them), or Q8_0 (every
2-D weight whose rows fill whole 32-value blocks; the rest f16); for other quantisations run llama.cpp's
``llama-quantize`` on an f16 export.

llama.cpp applies rotary embeddings to adjacent pairs, transformers (and layerfold) to the two halves of
each head for the llama and deci archs (qwen2 and qwen3 rotate halves, as transformers), so for those q and
k rows are permuted per head as llama.cpp's ``convert_hf_to_gguf.py`` does::

    W (n*hd, d) -> W.reshape(n, 2, hd/2, d).swapaxes(1, 2).reshape(n*hd, d)    (n = heads, KV heads for k)

``read_gguf_export`` reverses it (transformers' GGUF reader does the same for arch llama).
The tokenizer: copied verbatim from the GGUF file the model was first converted from when there is one
(the embedded default model), else built from tokenizer.json (byte-level BPE, pre-tokenizer "default").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerfold.core.dtypes import dtype_name
from layerfold.core.gguf_weights import PAIRED, dequantized, gguf_name, layerfold_names, permute_rope, unpermute_rope
from layerfold.core.paths import atomic_dir
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.interop.common import (
    Source,
    check_export_out,
    check_weights,
    export_dtype,
    read_source,
    write_provenance,
)
from layerfold.interop.formats import check_format, gguf_arch

FILE_NAME = "model.gguf"
# quantised types the export writes itself (as llama.cpp's converter's --outtype does): every 2-D weight whose rows
# fill whole blocks, the rest float16 (norm gains float32); other types: llama.cpp's llama-quantize on an f16 export
QUANT_DTYPES = ("q8_0",)


def quant_dtype(dtype: str | None) -> str | None:
    """``dtype`` as one of QUANT_DTYPES (any case), or None when it names a float dtype (or is None)."""
    q = dtype.lower() if isinstance(dtype, str) else None
    return q if q in QUANT_DTYPES else None

def _layer_of(name: str, spec: ModelSpec) -> LayerSpec | None:
    parts = name.split(".")
    return spec.layers[int(parts[1])] if parts[0] == "layers" else None


def llama3_rope_factors(spec: ModelSpec, head_dim: int) -> Tensor:
    """llama.cpp's rope_freqs tensor: the divisor of each base frequency under Llama-3 scaling."""
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    old, f = spec.rope_original_max_pos, spec.rope_factor
    lo, hi = spec.rope_low_freq_factor, spec.rope_high_freq_factor
    out = []
    for wl in (2 * math.pi / inv).tolist():
        if wl < old / hi:
            out.append(1.0)
        elif wl > old / lo:
            out.append(f)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - s) / f + s))
    return torch.tensor(out, dtype=torch.float32)


def _metadata(w: Any, spec: ModelSpec, arch: str, dt: torch.dtype, quant: str | None = None) -> None:
    import gguf

    attn = [l for l in spec.layers if l.has_attn]
    hd = attn[0].head_dim
    w.add_name("layerfold export")
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layers)
    if arch != "deci":
        l = spec.layers[0]
        w.add_feed_forward_length(l.d_ffn)
        w.add_head_count(l.n_heads)
        w.add_head_count_kv(l.n_kv_heads)
    else:  # per layer; 0 heads = attention-free layer
        w.add_feed_forward_length([l.d_ffn if l.has_mlp else 0 for l in spec.layers])
        w.add_head_count([l.n_heads if l.has_attn else 0 for l in spec.layers])
        w.add_head_count_kv([l.n_kv_heads if l.has_attn else 0 for l in spec.layers])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec.rope_theta)
    if spec.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_factor)
    if spec.rope_type == "yarn":  # llama.cpp derives the rest (attention factor, ramp) as HF's defaults do
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec.rope_factor)
        w.add_rope_scaling_orig_ctx_len(spec.rope_original_max_pos)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab_size)
    ftype = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
             torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dt] if quant is None else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(int(ftype))


def _add_tensor(w: Any, name: str, t: Tensor, dt: torch.dtype, quant: str | None = None) -> None:
    import gguf

    qt = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else None
    if qt is not None and t.ndim == 2 and t.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] == 0:
        w.add_tensor(name, gguf.quants.quantize(t.to(torch.float32).numpy(), qt), raw_dtype=qt)
    elif t.ndim == 1 or dt == torch.float32:  # norm gains stay f32, as llama.cpp's converter writes them
        w.add_tensor(name, t.to(torch.float32).numpy())
    elif dt == torch.float16:
        w.add_tensor(name, t.to(torch.float16).numpy())
    else:  # numpy has no bf16: hand over the bit pattern
        w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)


def export_gguf(src: str | Path | Source, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
                allow_nonfinite: bool = False) -> dict[str, Any]:
    """Write ``src`` as OUT/model.gguf (arch llama or deci); returns what was written. ``dtype``: float32 | float16 |
    bfloat16 | q8_0 (2-D weights in Q8_0 blocks, the rest float16), default the source's own."""
    import gguf

    s = src if isinstance(src, Source) else read_source(src)
    out = check_export_out(out, [s.name, s.path], overwrite)
    check_format(s.spec, "gguf", s.name)
    spec, arch = s.spec, gguf_arch(s.spec)
    quant = quant_dtype(dtype)
    dt = torch.float16 if quant else export_dtype(s.state, dtype)
    check_weights(s, dt, allow_nonfinite)
    with atomic_dir(out) as tmp:
        w = gguf.GGUFWriter(str(tmp / FILE_NAME), arch)
        _metadata(w, spec, arch, dt, quant)
        tok = write_tokenizer(w, s)
        n = 0
        if spec.rope_type == "llama3":
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                         llama3_rope_factors(spec, next(l.head_dim for l in spec.layers if l.has_attn)).numpy())
        for name, t in s.state.items():
            t = t.detach().to("cpu", torch.float32)
            l = _layer_of(name, spec)
            if name.endswith("attn.q.weight") and arch in PAIRED:
                t = permute_rope(t, l.n_heads)
            elif name.endswith("attn.k.weight") and arch in PAIRED:
                t = permute_rope(t, l.n_kv_heads)
            _add_tensor(w, gguf_name(name), t.contiguous(), dt, quant)
            n += t.numel()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        write_provenance(tmp, s, "gguf", {"gguf_arch": arch, "tokenizer": tok})
    info = {"out": str(out), "file": str(out / FILE_NAME), "format": "gguf", "architecture": arch,
            "layers": spec.n_layers, "params": n, "dtype": quant or dtype_name(dt), "tokenizer": tok is not None,
            "tokenizer_source": tok, "run": f"llama-cli -m {out / FILE_NAME}"}
    if tok is None:
        info["note"] = NO_TOKENIZER + NO_TOKENIZER_WHY[s.has_tokenizer]
    return info


# ---- tokenizer ----------------------------------------------------------------------------------------
def _origin_gguf(s: Source, hops: int = 4) -> Path | None:
    """The GGUF file this model was first converted from, following provenance ``source`` links."""
    from layerfold.core.checkpoint import read_config
    from layerfold.core.loading import ALIASES, resolve_alias

    prov = s.provenance
    for _ in range(hops):
        src = str(prov.get("source") or "")
        if src in ALIASES:
            try:
                return resolve_alias(src)
            except FileNotFoundError:
                return None
        p = Path(src)
        if p.suffix == ".gguf" and p.is_file():
            return p
        if not (p.is_dir() and (p / "config.json").is_file()):
            return None
        try:
            prov = read_config(p).get("provenance", {}) or {}
        except ValueError:
            return None
    return None


def _copy_tokenizer(w: Any, path: Path, vocab: int) -> bool:
    import gguf

    r = gguf.GGUFReader(str(path))
    toks = r.fields.get("tokenizer.ggml.tokens")
    if toks is None or len(toks.data) != vocab:
        return False
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            if f.types[0] == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
            else:
                w.add_key_value(key, f.contents(), f.types[0])
    return True


# tokenizer.json pre-tokenizers -> the llama.cpp pre-tokenizer (tokenizer.ggml.pre) that splits text the same way;
# llama.cpp's own converter identifies them by hashing a tokenisation, this by the pre-tokenizer's definition
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def pre_tokenizer(tj: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name for a tokenizer.json's ``pre_tokenizer``, or None when none is known to
    split text the same way (then the export writes no tokenizer rather than one that tokenizes differently)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for st in steps:
        kind = st.get("type")
        if kind == "ByteLevel":
            if st.get("add_prefix_space"):
                return None
            sig.append((kind, bool(st.get("use_regex", True))))
        elif kind == "Digits":
            sig.append((kind, bool(st.get("individual_digits"))))
        elif kind == "Split" and st.get("behavior") == "Isolated" and not st.get("invert"):
            sig.append((kind, (st.get("pattern") or {}).get("Regex")))
        else:
            return None
    return PRE_TOKENIZERS.get(tuple(sig))


def _tokenizer_from_json(w: Any, path: Path, vocab: int) -> bool:
    import gguf

    f = path / "tokenizer.json"
    if not f.is_file():
        return False
    tj = json.loads(f.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        return False  # only byte-level BPE (GPT-2 style) here; other tokenizers: llama.cpp's converter
    pre = pre_tokenizer(tj)
    if pre is None:
        return False
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in tokens}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if not tokens or min(tokens) < 0 or max(tokens) >= vocab or len(tokens) < vocab // 2:
        return False
    for i in range(vocab):  # ids the embedding has and the tokenizer never produces (Qwen pads its vocabulary)
        if i not in tokens:
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([tokens[i] for i in range(vocab)])
    w.add_token_types([types[i] for i in range(vocab)])
    gguf.SpecialVocab(path, load_merges=True).add_to_gguf(w, quiet=True)
    return True


def write_tokenizer(w: Any, s: Source) -> str | None:
    """Write the tokenizer metadata; returns where it came from ('gguf:PATH' | 'tokenizer.json') or None. Without
    one the file says ``tokenizer.ggml.model = "none"``: llama.cpp refuses a file without that key, and with it runs
    the model on token ids ({arch}.vocab_size gives the vocabulary)."""
    origin = _origin_gguf(s)
    if origin is not None and _copy_tokenizer(w, origin, s.spec.vocab_size):
        return f"gguf:{origin}"
    if s.has_tokenizer and _tokenizer_from_json(w, s.path, s.spec.vocab_size):
        return "tokenizer.json"
    w.add_tokenizer_model("none")
    return None


NO_TOKENIZER = "the GGUF file has no tokenizer (tokenizer.ggml.model \"none\": llama.cpp runs it on token ids only), "
NO_TOKENIZER_WHY = {
    False: "as the source has none. Fix: for text, save the checkpoint with its tokenizer (layerfold keeps the source "
           "model's when it prunes) and export again",
    True: "as its tokenizer is not a byte-level BPE whose vocabulary matches the model's and whose pre-tokenizer "
          "layerfold maps to llama.cpp's (gpt-2, smollm, llama-bpe, qwen2). Fix: for text, export --format hf and "
          "convert that with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers"}


# ---- reading an export back ---------------------------------------------------------------------------
def gguf_field(r: Any, key: str) -> Any:
    f = r.fields.get(key)
    return None if f is None else f.contents()


def gguf_rope_inv_freq(path: str | Path) -> Tensor:
    """The inverse rotary frequencies llama.cpp computes from a GGUF file: ``freq_base ** (-2i / n_rot)``, times
    ``1 / rope.scaling.factor`` (its freq_scale) and divided by the ``rope_freqs`` tensor (Llama-3 scaling)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = gguf_field(r, "general.architecture")
    n_rot = int(gguf_field(r, f"{arch}.rope.dimension_count"))
    inv = float(gguf_field(r, f"{arch}.rope.freq_base")) ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    factor = gguf_field(r, f"{arch}.rope.scaling.factor")
    inv = inv / float(factor) if factor else inv
    t = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)
    return inv if t is None else inv / torch.from_numpy(np.array(t.data, dtype=np.float64)).reshape(-1)


def read_gguf_export(path: str | Path) -> tuple[ModelSpec, dict[str, Tensor], str]:
    """(spec, float32 state in layerfold names, arch) of a GGUF file this module wrote."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = gguf_field(r, "general.architecture")
    L = gguf_field(r, f"{arch}.block_count")

    def per_layer(key: str) -> list[int]:
        v = gguf_field(r, f"{arch}.{key}")
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * L

    heads, kvs, ffns = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), \
        per_layer("feed_forward_length")
    d, hd = gguf_field(r, f"{arch}.embedding_length"), gguf_field(r, f"{arch}.attention.key_length")
    layers = tuple(LayerSpec(d, d, d, n_heads=h, n_kv_heads=k, head_dim=hd if h else 0, d_ffn=f, has_attn=h > 0,
                             has_mlp=f > 0, kind="decoder" if h else "mlp") for h, k, f in zip(heads, kvs, ffns,
                                                                                                strict=True))
    names = {t.name for t in r.tensors}
    spec = ModelSpec(vocab_size=int(gguf_field(r, f"{arch}.vocab_size")), d_model=d, layers=layers,
                     norm_eps=float(gguf_field(r, f"{arch}.attention.layer_norm_rms_epsilon")),
                     rope_theta=float(gguf_field(r, f"{arch}.rope.freq_base")),
                     max_position=int(gguf_field(r, f"{arch}.context_length")),
                     tie_embeddings=gguf_name("lm_head.weight") not in names, qkv_bias=arch == "qwen2",
                     qk_norm=arch == "qwen3", arch=arch if arch in ("qwen2", "qwen3") else "llama").validate()
    back = layerfold_names(L)
    state = {back[t.name]: dequantized(t, back[t.name], spec, arch) for t in r.tensors if t.name in back}
    return spec, state, arch


__all__ = ["FILE_NAME", "QUANT_DTYPES", "export_gguf", "gguf_field", "gguf_name", "gguf_rope_inv_freq",
           "llama3_rope_factors", "permute_rope", "quant_dtype", "read_gguf_export", "unpermute_rope"]
