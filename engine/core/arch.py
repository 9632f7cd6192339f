"""Architecture knowledge in one declarative place: HF config <-> ModelSpec and the weight-name map.

Supported: Llama (SmolLM, TinyLlama, Llama-2/3 with rope scaling: linear, llama3, yarn, longrope), Mistral, Qwen2
(qkv bias), Qwen3 (q/k norm), Phi-3 / Phi-4 (fused q/k/v and gate/up, split at load time; longrope: Phi-3-*-128k,
Phi-3.5). Everything else gets a
clear error listing these. The rope and sliding-window settings are read by ``layerfold.core.rope_config``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from layerfold.core.partial_rotary import permute_state, rotary_dim
from layerfold.core.rope_config import longrope_fields, rope_fields, rope_scaling, rope_source, sliding_window
from layerfold.core.rope_config import number as _number
from layerfold.core.rope_config import setting as _get
from layerfold.core.spec import LayerSpec, ModelSpec

SUPPORTED = {  # HF model_type -> HF architecture class name
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# layerfold name -> HF name; "{i}" is the layer index.
KEY_MAP: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attn.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attn.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


# How each family's transformers class applies config.sliding_window (``rope_config.sliding_window``): "layers" to
# every layer or those layer_types marks, "flag" only with use_sliding_window, "all" to every layer; else never.
WINDOW_RULES = {"mistral": "layers", "qwen2": "flag", "qwen3": "flag", "phi3": "all"}

# ---- Phi-3 / Phi-4 (model_type "phi3": Phi-3-mini/medium, Phi-3.5-mini, Phi-4, Phi-4-mini) -----------------------
# Llama layers (RMSNorm, SwiGLU, rotary on halves, no biases) whose checkpoints fuse q/k/v and gate/up into one
# matrix each. Read apart at load time, so nothing downstream knows: HF name -> the layerfold names it holds, in row
# order, each with the LayerSpec size giving its rows.
FUSED: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {"phi3": {
    "model.layers.{i}.self_attn.qkv_proj.weight": (("attn.q.weight", "q_dim"), ("attn.k.weight", "kv_dim"),
                                                   ("attn.v.weight", "kv_dim")),
    "model.layers.{i}.mlp.gate_up_proj.weight": (("mlp.gate.weight", "d_ffn"), ("mlp.up.weight", "d_ffn")),
}}
# config defaults of a family's transformers class that change its output and differ from the ones read for Llama
DEFAULTS: dict[str, dict[str, Any]] = {"phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                                                "original_max_position_embeddings": 4096}}
# rope scalings of a family that its transformers class reads as another (Phi3Config rewrites the legacy "su" and
# "yarn" of Phi-3-*-128k / Phi-3.5 configs as "longrope"), and what each family's class accepts
ROPE_ALIASES: dict[str, dict[str, str]] = {"phi3": {"su": "longrope", "yarn": "longrope"}}
ROPE_ALLOWED: dict[str, tuple[str, ...]] = {"phi3": ("default", "longrope")}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # the scalings read (transformers' rope utils)
# bias flags a family's transformers class never reads (its layers have no biases): set, they are refused
NO_BIAS = ("phi3",)
# the class an unfused copy of a family's weights is written as (no sliding window, one), e.g. by ``export --format hf``
UNFUSED_AS = {"phi3": ("llama", "mistral")}

# config keys every supported family needs (a config without them describes no model layerfold can build)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_to_lf_patterns() -> list[tuple[str, str]]:
    return [(hf, lf) for lf, hf in KEY_MAP.items()]


def _layer_pattern(name: str) -> tuple[str, str | None]:
    """An HF tensor name with its layer index replaced by "{i}", and the index (None outside the layers)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return ".".join(parts[:2] + ["{i}"] + parts[3:]), parts[2]
    return name, None


def hf_name_to_layerfold(name: str) -> str | None:
    """Map one HF tensor name to its layerfold name (None for buffers such as rotary inv_freq)."""
    name, idx = _layer_pattern(name)
    for hf, lf in _hf_to_lf_patterns():
        if hf == name:
            return lf.replace("{i}", idx) if idx is not None else lf
    return None


# DeciLM / Nemotron-NAS (``export --format decilm``, what vLLM serves): Llama blocks with per-layer KV heads and FFN
# widths, or either part absent, in ``block_configs``; read back as a Llama-family spec of those layers.
DECI_TYPE = "nemotron-nas"


def check_supported(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED and model_type != DECI_TYPE:
        raise ValueError(
            f"{where}: architecture {model_type!r} is not supported. layerfold supports "
            f"{', '.join(SUPPORTED)} ({', '.join(SUPPORTED.values())}). "
            "Fix: convert a model of one of these families, or open an issue for the architecture.")


def check_not_quantized(cfg: Any, where: str) -> None:
    """Refuse a quantized checkpoint (GPTQ, AWQ, bitsandbytes, FP8, ...) from its config, before its weights."""
    quant = _get(cfg, "quantization_config")
    how = str(_get(quant, "quant_method", type(quant).__name__) or "unknown method")
    if quant and "gguf" not in how.lower():  # transformers marks a GGUF it has dequantized (GgufConfig): fp32 now
        how = how.removeprefix("QuantizationMethod.").lower()
        raise ValueError(f"{where}: the checkpoint is quantized ({how}); layerfold calibrates, prunes and runs "
                         "full-precision weights (fp32, fp16, bf16). Fix: use the model's unquantized release, or "
                         "dequantize it first (transformers: load it, then save_pretrained the dequantized model); "
                         "a quantized GGUF file is dequantized by layerfold itself")


def spec_from_hf_config(cfg: Any, where: str = "config") -> ModelSpec:
    """Build the dense ModelSpec of an HF config (a PretrainedConfig or its dict)."""
    if not isinstance(cfg, dict) and not hasattr(cfg, "model_type"):
        raise ValueError(f"{where}: the config is a JSON {type(cfg).__name__}, not an object. Fix: config.json must "
                         "hold one JSON object with the model's settings; re-download or re-create it")
    mt = _get(cfg, "model_type")
    check_supported(mt, where)
    check_not_quantized(cfg, where)
    if mt == DECI_TYPE:
        return _deci_spec(cfg, where)
    missing = [k for k in REQUIRED_KEYS if not isinstance(_get(cfg, k), int) or isinstance(_get(cfg, k), bool)
               or _get(cfg, k) < 1]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} missing or not a positive integer in the config. Fix: give "
                         f"config.json every one of {', '.join(REQUIRED_KEYS)} (the model's own values)")
    if _get(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act={_get(cfg, 'hidden_act')!r}; layerfold runs SwiGLU (silu) MLPs. Fix: "
                         "use a model of a supported family with its own config (their hidden_act is silu)")
    if mt == "llama" and (_get(cfg, "attention_bias", False) or _get(cfg, "mlp_bias", False)):
        raise ValueError(f"{where}: Llama with attention_bias/mlp_bias is not supported (no such public model "
                         "is known to need it); open an issue with the model name")
    _family_checks(cfg, mt, where)
    d = _get(cfg, "hidden_size")
    nh = _get(cfg, "num_attention_heads")
    opt = {k: _get(cfg, k) for k in ("num_key_value_heads", "head_dim")}  # null: the default
    opt = {k: v if v is None else _number(v, k, where, whole=True) for k, v in opt.items()}
    nkv = opt["num_key_value_heads"] or nh
    hd = opt["head_dim"] or d // nh
    ffn = _get(cfg, "intermediate_size")
    layer = LayerSpec(d_in=d, d_mid=d, d_out=d, n_heads=nh, n_kv_heads=nkv, head_dim=hd, d_ffn=ffn)
    rot = rotary_dim(cfg, mt, hd, where)  # (0: the whole head)
    theta, rtype, src = rope_source(cfg, where)
    rtype = ROPE_ALIASES.get(mt, {}).get(rtype, rtype)
    if mt in ROPE_ALLOWED and rtype not in ROPE_ALLOWED[mt]:
        raise ValueError(f"{where}: rope scaling {rtype!r} is not one {SUPPORTED[mt]} computes (it takes "
                         f"{', '.join(ROPE_ALLOWED[mt])}). Fix: restore the model's own rope_scaling")
    if rtype not in ROPE_TYPES:
        raise ValueError(f"{where}: rope scaling {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}. "
                         "Fix: use a model with one of those, or open an issue for this scaling")
    dflt = DEFAULTS.get(mt, {})
    max_pos = _number(_get(cfg, "max_position_embeddings", dflt.get("max_position_embeddings", 8192)),
                      "max_position_embeddings", where, whole=True)
    given = max_pos if _get(cfg, "max_position_embeddings") is not None else None
    if rtype == "longrope":  # (the class default counts here: Phi3Config's 4096 positions)
        rope = longrope_fields(cfg, src, given or (max_pos if "max_position_embeddings" in dflt else None),
                               dflt.get("original_max_position_embeddings"), rot or hd, where)
    else:
        rope = rope_fields(rtype, src, given, where)
    eos = _get(cfg, "eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    sw = sliding_window(cfg, WINDOW_RULES.get(mt), where)
    return ModelSpec(
        vocab_size=_get(cfg, "vocab_size"),
        d_model=d,
        layers=tuple(layer for _ in range(_get(cfg, "num_hidden_layers"))),
        norm_eps=_number(_get(cfg, "rms_norm_eps", dflt.get("rms_norm_eps", 1e-6)), "rms_norm_eps", where),
        rope_theta=_number(theta, "rope_theta", where),
        rope_type=rtype, **rope, rotary_dim=rot,
        max_position=max_pos,
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(_get(cfg, "attention_bias", False)) and mt != "llama",
        qk_norm=mt == "qwen3",
        sliding_window=sw,
        arch=mt,
        bos_token_id=_get(cfg, "bos_token_id"),
        eos_token_ids=eos_ids,
    ).validate()


def _family_checks(cfg: Any, mt: str, where: str) -> None:
    """Refuse what a family's config may say that layerfold would not compute as its transformers class does."""
    if mt in NO_BIAS and any(_get(cfg, k, False) for k in ("attention_bias", "mlp_bias")):
        raise ValueError(f"{where}: attention_bias/mlp_bias set, but {SUPPORTED[mt]} has no biases (transformers "
                         "would not load them). Fix: restore the model's own config.json (they are false or absent)")


def ffn_mult_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width vLLM (and NVIDIA's DeciLM code) derive from ``ffn_mult``."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def _deci_spec(cfg: Any, where: str) -> ModelSpec:
    """The spec of a DeciLM config: its global settings read as a Llama config's, then one layer per block_configs
    entry (no-op attention: an MLP block; no-op FFN: an attention-only layer)."""
    blocks, n = _get(cfg, "block_configs"), _get(cfg, "num_hidden_layers")
    if not isinstance(blocks, list) or len(blocks) != n:
        got = f"{len(blocks)} blocks" if isinstance(blocks, list) else f"a JSON {type(blocks).__name__}"
        raise ValueError(f"{where}: block_configs must list one block per layer (num_hidden_layers={n!r}), not {got}. "
                         "Fix: restore the export's own config.json")
    bias = {k: _get(cfg, k, False) for k in ("qkv_bias", "attention_bias", "mlp_bias")}
    if any(not isinstance(v, bool) for v in bias.values()) or bias["attention_bias"] or bias["mlp_bias"]:
        raise ValueError(f"{where}: {bias}: layerfold reads DeciLM blocks with q/k/v biases at most (qkv_bias), no "
                         "o_proj or MLP biases, each flag a JSON true or false. Fix: restore the export's own "
                         "config.json")
    base = spec_from_hf_config({**(cfg if isinstance(cfg, dict) else cfg.to_dict()), "model_type": "llama",
                                "attention_bias": False, "mlp_bias": False}, where)
    d, first = base.d_model, base.layers[0]
    layers = []
    for i, b in enumerate(blocks):
        a, f = (b.get(k) if isinstance(b, dict) else None for k in ("attention", "ffn"))
        if not isinstance(a, dict) or not isinstance(f, dict) or a.get("replace_with_linear") or \
                f.get("replace_with_linear") or not isinstance(a.get("no_op"), bool) or \
                not isinstance(f.get("no_op"), bool):
            raise ValueError(f"{where}: block {i} is {b!r}; layerfold reads blocks whose attention and ffn are each "
                             "present or no_op (replace_with_linear is not supported). Fix: load a model layerfold "
                             "exported, or open an issue for this model")
        if a["no_op"] and f["no_op"]:
            raise ValueError(f"{where}: block {i}: attention and ffn are both no_op (a layer that does nothing), which "
                             "layerfold has no layer for. Fix: restore the export's own config.json")
        group = 1 if a["no_op"] else _number(a.get("n_heads_in_group"), "n_heads_in_group", where, whole=True)
        key = "ffn_mult" if f.get("ffn_mult") is not None else "intermediate_size"
        width = 0 if f["no_op"] else (ffn_mult_width(_number(f[key], key, where), d) if key == "ffn_mult" else
                                      _number(f.get(key), key, where, whole=True))
        if group < 1 or first.n_heads % group:
            raise ValueError(f"{where}: block {i}: n_heads_in_group={group} is not a whole number >= 1 that divides "
                             f"the {first.n_heads} heads. Fix: restore the export's own config.json")
        if not f["no_op"] and width < 1:
            raise ValueError(f"{where}: block {i}: ffn {key}={f[key]!r} gives an FFN width of {width}. Fix: a block "
                             "without an FFN says \"no_op\": true; restore the export's own config.json")
        layers.append(LayerSpec(d, d, d, n_heads=0 if a["no_op"] else first.n_heads,
                                n_kv_heads=0 if a["no_op"] else first.n_heads // group,
                                head_dim=0 if a["no_op"] else first.head_dim, d_ffn=width, has_attn=not a["no_op"],
                                has_mlp=not f["no_op"], kind="mlp" if a["no_op"] else "decoder"))
    return replace(base, layers=tuple(layers), qkv_bias=bias["qkv_bias"]).validate()


def state_from_hf(hf_state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]:
    """Rename an HF state dict to layerfold names; drops the tied head and non-weight buffers, and splits a family's
    fused tensors (``FUSED``) into row blocks (views: no copy), each checked against the spec's sizes first. With
    partial rotary (spec.rotary_dim) q/k rows are permuted (copies: core.partial_rotary)."""
    out: dict[str, Tensor] = {}
    fused = FUSED.get(spec.arch, {})
    for name, t in hf_state.items():
        key, idx = _layer_pattern(name)
        if key in fused and idx is not None and int(idx) < spec.n_layers:
            out.update(_split_fused(name, t, fused[key], idx, spec))
            continue
        lf = hf_name_to_layerfold(name)
        if lf is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"unexpected tensor {name!r} in the HF checkpoint: layerfold does not know where it "
                             f"goes for {spec.arch}. Fix: check the model is a plain {spec.arch} checkpoint")
        if lf == "lm_head.weight" and spec.tie_embeddings:
            continue
        out[lf] = t
    return permute_state(out, spec)  # (partial rotary: q/k rows into whole-head rotary's layout)


def _split_fused(name: str, t: Tensor, parts: tuple[tuple[str, str], ...], idx: str, spec: ModelSpec) -> \
        dict[str, Tensor]:
    """The layerfold tensors a fused HF tensor holds, one block of rows each (``FUSED``)."""
    layer = spec.layers[int(idx)]
    rows = [getattr(layer, size) for _, size in parts]
    want = (sum(rows), layer.d_in)
    if tuple(t.shape) != want:
        sizes = " + ".join(f"{lf.split('.')[1]} {getattr(layer, size)}" for lf, size in parts)
        raise ValueError(
            f"tensor {name!r} has shape {tuple(t.shape)}, but the config asks for {want} (rows {sizes}: "
            f"{layer.n_heads} heads and {layer.n_kv_heads} KV heads of {layer.head_dim}, FFN {layer.d_ffn}; "
            f"hidden {layer.d_in}). Fix: config.json does not describe these weights (num_attention_heads, "
            "num_key_value_heads, head_dim, intermediate_size or hidden_size edited?); restore the model's own")
    return {f"layers.{idx}.{lf}": block for (lf, _), block in zip(parts, t.split(rows), strict=True)}


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """A vanilla HF config for a uniform spec (every layer a plain, same-shaped decoder layer)."""
    if not spec.uniform:
        raise ValueError(
            "this model cannot be exported as a vanilla HF checkpoint: its layers are not all alike "
            f"({describe_nonuniform(spec)}). HF configs hold one shape for every layer. Fix: keep the "
            "layerfold checkpoint and serve it with `layerfold serve`, or export a depth-pruned model whose "
            "remaining layers are plain decoder layers")
    if spec.rotary_dim:  # (q/k rows held permuted: core.partial_rotary; interop.formats.PARTIAL_NOT)
        raise ValueError(f"this model cannot be exported as a vanilla HF checkpoint: its partial rotary (rotary_dim "
                         f"{spec.rotary_dim}) is held in a permuted q/k layout no class here reads. Fix: keep the "
                         "layerfold checkpoint and serve it with `layerfold serve`")
    if spec.arch in UNFUSED_AS:  # the weights go out unfused (state_to_hf), as a class that computes the same
        spec = replace(spec, arch=UNFUSED_AS[spec.arch][spec.sliding_window is not None])
    cfg = hf_base_config(spec, spec.arch)
    if spec.rope_type != "default":
        cfg["rope_scaling"] = rope_scaling(spec)
    if spec.rope_type == "longrope":  # (where transformers 4.x reads it; 5 prefers it to the entry's)
        cfg["original_max_position_embeddings"] = spec.rope_original_max_pos
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if spec.arch == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.arch in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
    if spec.arch == "qwen3":
        cfg["attention_bias"] = False
    return cfg


def hf_base_config(spec: ModelSpec, arch: str) -> dict[str, Any]:
    """The config.json keys every HF class written here shares (class ``arch``; sizes from the first layer)."""
    l = spec.layers[0]
    return {
        "architectures": [SUPPORTED[arch]],
        "model_type": arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": l.d_ffn,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": l.n_heads,
        "num_key_value_heads": l.n_kv_heads,
        "head_dim": l.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_theta": spec.rope_theta,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else
        (spec.eos_token_ids[0] if spec.eos_token_ids else None),
        "torch_dtype": "float32",
    }


def describe_nonuniform(spec: ModelSpec) -> str:
    """Why ``spec`` is not uniform (its first layer that is not the same plain decoder layer as layer 0)."""
    first = spec.layers[0]
    for i, l in enumerate(spec.layers):
        if l.kind == "mlp":
            return f"layer {i} is an LLM-Streamline MLP replacement block (attention-free), not a decoder layer"
        if l.attn_shortcut or l.mlp_shortcut:
            return f"layer {i} carries SliceGPT shortcut matrices"
        if not (l.has_attn and l.has_mlp):
            return f"layer {i} lacks {'attention' if not l.has_attn else 'an MLP'}"
        if l != first:
            return f"layer {i} has a different shape from layer 0 (an HF config holds one shape for every layer)"
    return "the residual width differs from the embedding width"


def state_to_hf(state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        parts = name.split(".")
        key, idx = name, None
        if parts[0] == "layers":
            idx = parts[1]
            key = ".".join(["layers", "{i}"] + parts[2:])
        hf = KEY_MAP.get(key)
        if hf is None:
            raise ValueError(f"tensor {name!r} has no HF equivalent")
        out[hf.replace("{i}", idx) if idx is not None else hf] = t.contiguous()
    return out
