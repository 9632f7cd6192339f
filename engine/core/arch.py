"""Architecture knowledge in one declarative place: HF config <-> ModelSpec and the weight-name map.

Supported: Llama (SmolLM, TinyLlama, Llama-2/3 with rope scaling: linear, llama3, yarn), Mistral, Qwen2
(qkv bias), Qwen3 (q/k norm). Everything else gets a clear error listing these.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Real
from typing import Any

from torch import Tensor

from layerfold.core.spec import LayerSpec, ModelSpec

SUPPORTED = {  # HF model_type -> HF architecture class name
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
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


# config keys every supported family needs (a config without them describes no model layerfold can build)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_to_lf_patterns() -> list[tuple[str, str]]:
    return [(hf, lf) for lf, hf in KEY_MAP.items()]


def hf_name_to_layerfold(name: str) -> str | None:
    """Map one HF tensor name to its layerfold name (None for buffers such as rotary inv_freq)."""
    parts = name.split(".")
    idx = None
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        idx = parts[2]
        name = ".".join(parts[:2] + ["{i}"] + parts[3:])
    for hf, lf in _hf_to_lf_patterns():
        if hf == name:
            return lf.replace("{i}", idx) if idx is not None else lf
    return None


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _number(v: Any, key: str, where: str, whole: bool = False) -> Any:
    """A numeric config setting as int (``whole``) or float. JSON true/false is refused (Python reads true as 1:
    max_position_embeddings 1, rms_norm_eps 1.0), and so are fractions where a whole number belongs."""
    try:
        x = float(v) if isinstance(v, str) else v
        ok = isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and (not whole or x == int(x))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: {key}={v!r} is not {'a whole number' if whole else 'a finite number'}. Fix: write "
                         "it as a JSON number (no quotes, not true/false), the model's own value")
    return int(x) if whole else float(x)


# DeciLM / Nemotron-NAS (``export --format decilm``, what vLLM serves): Llama blocks with per-layer KV heads and FFN
# widths, or either part absent, in ``block_configs``; read back as a Llama-family spec of those layers.
DECI_TYPE = "nemotron-nas"


def check_supported(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED and model_type != DECI_TYPE:
        raise ValueError(
            f"{where}: architecture {model_type!r} is not supported. layerfold supports "
            f"{', '.join(sorted(SUPPORTED))} ({', '.join(SUPPORTED.values())}). "
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
    d = _get(cfg, "hidden_size")
    nh = _get(cfg, "num_attention_heads")
    opt = {k: _get(cfg, k) for k in ("num_key_value_heads", "head_dim")}  # null: the default
    opt = {k: v if v is None else _number(v, k, where, whole=True) for k, v in opt.items()}
    nkv = opt["num_key_value_heads"] or nh
    hd = opt["head_dim"] or d // nh
    ffn = _get(cfg, "intermediate_size")
    layer = LayerSpec(d_in=d, d_mid=d, d_out=d, n_heads=nh, n_kv_heads=nkv, head_dim=hd, d_ffn=ffn)
    theta, rtype, src = _rope_source(cfg, where)
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(f"{where}: rope scaling {rtype!r} is not supported; supported: default, linear, llama3, yarn. "
                         "Fix: use a model with one of those, or open an issue for this scaling")
    max_pos = _number(_get(cfg, "max_position_embeddings", 8192), "max_position_embeddings", where, whole=True)
    rope = _rope_fields(rtype, src, max_pos if _get(cfg, "max_position_embeddings") is not None else None, where)
    eos = _get(cfg, "eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    sw = _window(cfg, mt, where)
    return ModelSpec(
        vocab_size=_get(cfg, "vocab_size"),
        d_model=d,
        layers=tuple(layer for _ in range(_get(cfg, "num_hidden_layers"))),
        norm_eps=_number(_get(cfg, "rms_norm_eps", 1e-6), "rms_norm_eps", where),
        rope_theta=_number(theta, "rope_theta", where),
        rope_type=rtype, **rope,
        max_position=max_pos,
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(_get(cfg, "attention_bias", False)) and mt != "llama",
        qk_norm=mt == "qwen3",
        sliding_window=sw,
        arch=mt,
        bos_token_id=_get(cfg, "bos_token_id"),
        eos_token_ids=eos_ids,
    ).validate()


def _rope_source(cfg: Any, where: str) -> tuple[Any, str, dict[str, Any]]:
    """(rope_theta, scaling type, scaling entry). transformers >= 5 writes rope_parameters (theta inside) and reads
    rope_scaling first; 4.x reads rope_theta and rope_scaling only: a config they read differently is refused."""
    thetas, says = [], []
    for key in ("rope_parameters", "rope_scaling"):
        d = _get(cfg, key) or {}
        if not isinstance(d, dict) or any(isinstance(v, dict) for v in d.values()):
            raise ValueError(f"{where}: {key}={d!r} is not one JSON object of rope settings (per-layer-type entries "
                             "are not supported). Fix: restore the model's own config.json")
        kinds = [d[k] for k in ("rope_type", "type") if d.get(k) is not None]
        if len(kinds) == 2 and kinds[0] != kinds[1]:
            raise ValueError(f"{where}: {key} says rope_type={kinds[0]!r} but type={kinds[1]!r}. Fix: keep one of the "
                             "two keys, with the model's own scaling")
        thetas += [d["rope_theta"]] if d.get("rope_theta") is not None else []
        args = {k: v for k, v in d.items() if k not in ("rope_type", "type", "rope_theta")}
        if kinds[:1] != ["default"] and (kinds or args):  # a scaling (an explicit default's factor: unused, as in HF)
            says.append((kinds[0] if kinds else "default", args))
    if len(says) == 2 and says[0] != says[1]:
        raise ValueError(f"{where}: rope_parameters {says[0]} and rope_scaling {says[1]} disagree (transformers 5 "
                         "reads rope_scaling, 4.x only it). Fix: keep one of them, with the model's own scaling")
    thetas += [_get(cfg, "rope_theta")] if _get(cfg, "rope_theta") is not None else []
    if any(t != thetas[0] for t in thetas[1:]):
        raise ValueError(f"{where}: rope_theta is given as {' and '.join(map(repr, thetas))} (rope_parameters, "
                         "rope_scaling, rope_theta). Fix: keep one of them, the model's own value")
    return (thetas or [10000.0])[0], *(says or [("default", {})])[0]


def _window(cfg: Any, mt: str, where: str) -> int | None:
    """The sliding window every layer applies, or None (Llama has none). Qwen2/Qwen3 apply theirs from layer
    max_window_layers on (or where layer_types says "sliding_attention"); layerfold has one window for all layers,
    so a model whose layers differ is refused rather than run with the window everywhere."""
    use = mt == "mistral" or mt in ("qwen2", "qwen3") and _get(cfg, "use_sliding_window", False)
    if not use or _get(cfg, "sliding_window") is None:
        return None
    sw = _number(_get(cfg, "sliding_window"), "sliding_window", where, whole=True)
    n, types = _get(cfg, "num_hidden_layers"), _get(cfg, "layer_types")
    if types is None and mt in ("qwen2", "qwen3"):
        first = _number(_get(cfg, "max_window_layers", 28), "max_window_layers", where, whole=True)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is None:
        return sw
    known = isinstance(types, list) and all(t in ("full_attention", "sliding_attention") for t in types)
    if not known or len(types) != n:
        raise ValueError(f"{where}: layer_types={types!r} is not one \"full_attention\" or \"sliding_attention\" per "
                         f"layer (num_hidden_layers={n}). Fix: restore the model's own layer_types, or remove it")
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return None
    if len(windowed) != n:
        raise ValueError(f"{where}: layers {windowed[0]}..{windowed[-1]} ({len(windowed)} of {n}) attend through a "
                         f"sliding window of {sw} tokens and the others to every token; layerfold applies one "
                         "attention span to every layer. Fix: use the model with use_sliding_window false (its "
                         "released setting for Qwen2/Qwen3), or open an issue for per-layer windows")
    return sw


def _rope_fields(rtype: str, src: dict[str, Any], max_pos: int | None, where: str) -> dict[str, Any]:
    """The spec's rope_* fields other than rope_type, from a config's scaling entry (HF's meanings and defaults);
    ``max_pos``: the config's max_position_embeddings, None where it gives none."""
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rtype, ())
    if any(src.get(k) is None for k in need):
        raise ValueError(f"{where}: rope scaling {rtype!r} ({src}) lacks one of {', '.join(need)}. Fix: give the "
                         "model's own value of each")
    if rtype == "default":
        if src.get("factor") not in (None, 1):  # no type at all: transformers 4.x fails, 5.x runs it unscaled
            raise ValueError(f"{where}: rope scaling {src} has a factor but no scaling type, so nothing would use it. "
                             "Fix: set rope_type to the model's scaling (linear, llama3 or yarn), or remove factor")
        return {}
    if rtype == "linear":
        return {"rope_factor": _number(src["factor"], "factor", where)}
    old = src.get("original_max_position_embeddings")
    if max_pos is None and (old is None or src.get("factor") is None):
        raise ValueError(f"{where}: rope scaling {rtype!r} ({src}) leaves original_max_position_embeddings or factor "
                         "to max_position_embeddings, which the config lacks. Fix: give it (the model's own value)")
    old = max_pos if old is None else _number(old, "original_max_position_embeddings", where, whole=True)
    if old < 1:
        raise ValueError(f"{where}: rope scaling original_max_position_embeddings={old} is not a context length. "
                         "Fix: give the model's pretraining context (a whole number >= 1)")
    if rtype == "llama3":
        return {"rope_original_max_pos": old, **{f"rope_{k}": _number(src[k], k, where) for k in need}}
    # DeepSeek-style configs leave the factor out: it is then the ratio of the two contexts
    factor = max_pos / old if src.get("factor") is None else _number(src["factor"], "factor", where)
    truncate = src.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{where}: rope scaling truncate={truncate!r} is not true or false. Fix: write it as a JSON "
                         "boolean, the model's own value")

    def mscale(scale: float, m: float = 1.0) -> float:  # YaRN's attention temperature
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = src.get("attention_factor")
    if attn is not None:
        attn = _number(attn, "attention_factor", where)
    elif src.get("mscale") and src.get("mscale_all_dim"):
        attn = mscale(factor, _number(src["mscale"], "mscale", where)) / \
            mscale(factor, _number(src["mscale_all_dim"], "mscale_all_dim", where))
    else:
        attn = mscale(factor)
    return {"rope_factor": factor, "rope_original_max_pos": old, "rope_truncate": truncate,
            "rope_beta_fast": _number(src.get("beta_fast") or 32.0, "beta_fast", where),
            "rope_beta_slow": _number(src.get("beta_slow") or 1.0, "beta_slow", where), "rope_attention_factor": attn}


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
    """Rename an HF state dict to layerfold names; drops the tied head and non-weight buffers."""
    out: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        lf = hf_name_to_layerfold(name)
        if lf is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"unexpected tensor {name!r} in the HF checkpoint: layerfold does not know where it "
                             f"goes for {spec.arch}. Fix: check the model is a plain {spec.arch} checkpoint")
        if lf == "lm_head.weight" and spec.tie_embeddings:
            continue
        out[lf] = t
    return out


def rope_scaling(spec: ModelSpec) -> dict[str, Any]:
    """HF's ``rope_scaling`` entry for a spec whose rotary embedding is scaled ("linear", "llama3" or "yarn")."""
    scaling: dict[str, Any] = {"rope_type": spec.rope_type, "factor": spec.rope_factor}
    if spec.rope_type == "llama3":
        scaling.update(low_freq_factor=spec.rope_low_freq_factor, high_freq_factor=spec.rope_high_freq_factor,
                       original_max_position_embeddings=spec.rope_original_max_pos)
    if spec.rope_type == "yarn":  # the attention factor as a number: no reader has to re-derive it
        scaling.update(original_max_position_embeddings=spec.rope_original_max_pos, beta_fast=spec.rope_beta_fast,
                       beta_slow=spec.rope_beta_slow, attention_factor=spec.rope_attention_factor)
        if not spec.rope_truncate:
            scaling["truncate"] = False
    return scaling


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """A vanilla HF config for a uniform spec (every layer a plain, same-shaped decoder layer)."""
    if not spec.uniform:
        raise ValueError(
            "this model cannot be exported as a vanilla HF checkpoint: its layers are not all alike "
            f"({describe_nonuniform(spec)}). HF configs hold one shape for every layer. Fix: keep the "
            "layerfold checkpoint and serve it with `layerfold serve`, or export a depth-pruned model whose "
            "remaining layers are plain decoder layers")
    l = spec.layers[0]
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED[spec.arch]],
        "model_type": spec.arch,
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
    if spec.rope_type != "default":
        cfg["rope_scaling"] = rope_scaling(spec)
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if spec.arch == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.arch in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
    if spec.arch == "qwen3":
        cfg["attention_bias"] = False
    return cfg


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
