"""Tiny models for the tests: one builder (``tiny_spec`` + ``tiny_model``), the heterogeneous specs
several files share, and tiny random-weight Hugging Face models of each supported family.

``tiny_model`` draws weights one of three ways, all seeded by ``seed``:

* default: ``torch.manual_seed(seed)`` then torch's own initialisation in ``build_model``;
* ``std=s``: ``layerfold.core.model.init_weights(m, s, seed)`` (N(0, s) matrices and biases, norm gains 1);
* ``one_generator=True`` (with ``std``): every parameter in order from one ``torch.Generator(seed)``,
  matrices N(0, std), the embedding N(0, embed_std).

``norm_gains=True`` then makes the RMSNorm gains U(0.5, 1.5): gains of 1.0 hide mapping mistakes (in
the first two ways they come from the global generator, right after ``torch.manual_seed(seed)`` and
the build; with ``one_generator`` from that generator, in parameter order).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

import layerfold
from layerfold.core.arch import spec_from_hf_config, state_from_hf
from layerfold.core.model import Model, build_model, init_weights
from layerfold.core.spec import LayerSpec, ModelSpec, dense_layer

SMOLLM2_VOCAB = 49152  # the tokenizer of the embedded default model (smollm2-135m)


def embedded_tokenizer() -> Any:
    """The embedded default model's tokenizer: from its package (the alias), or, where that package is
    missing (a GPU machine with no package registry), from the copy ``make gpu-prep`` saves in
    ``.gpu_assets/tokenizer`` and the device call carries (GPU run 3 lost a gpu test to the missing package)."""
    from pathlib import Path

    from layerfold.core.loading import load_tokenizer, resolve

    carried = Path(__file__).resolve().parents[2] / ".gpu_assets" / "tokenizer"
    try:
        return load_tokenizer(resolve("smollm2-135m", quiet=True))
    except FileNotFoundError:
        if not carried.is_dir():
            raise
        return load_tokenizer(carried)


def tiny_spec(*, d_model: int = 48, n_layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
              ffn: int = 72, vocab: int = 61, tie: bool = False, mlp_blocks: tuple[int, ...] = (),
              **fields: Any) -> ModelSpec:
    """A uniform Llama-like spec (GQA, head_dim = d_model // heads unless given); ``fields`` sets any other
    ModelSpec field. Layers listed in ``mlp_blocks`` become MLP replacement blocks (as streamline leaves them)."""
    layer = dense_layer(d_model, heads, kv_heads, head_dim or d_model // heads, ffn)
    layers = tuple(replace(layer, kind="mlp", has_attn=False, n_heads=0, n_kv_heads=0, head_dim=0)
                   if i in mlp_blocks else layer for i in range(n_layers))
    return ModelSpec(vocab_size=vocab, d_model=d_model, layers=layers, tie_embeddings=tie, **fields).validate()


def tiny_model(spec: ModelSpec | None = None, *, seed: int = 0, std: float | None = None, norm_gains: bool = False,
               one_generator: bool = False, embed_std: float | None = None, dtype: torch.dtype = torch.float32,
               **spec_kw: Any) -> Model:
    """A model of ``spec`` (or of ``tiny_spec(**spec_kw)``) in eval mode, weights as the module docstring says."""
    if spec is None:
        spec = tiny_spec(**spec_kw)
    elif spec_kw:
        raise TypeError(f"give a spec or spec keywords, not both: {sorted(spec_kw)}")
    if one_generator and std is None:
        raise ValueError("one_generator needs std")
    if embed_std is not None and not one_generator:
        raise ValueError("embed_std is only drawn by the one_generator initialisation")
    torch.manual_seed(seed)
    m = build_model(spec)
    with torch.no_grad():
        if one_generator:
            g = torch.Generator().manual_seed(seed)
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g) if norm_gains else torch.ones_like(p))
                else:
                    s = embed_std if embed_std is not None and name.startswith("embed") else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        else:
            if std is not None:
                init_weights(m, std=std, seed=seed)
            if norm_gains:
                for name, p in m.named_parameters():
                    if name.endswith("norm.weight"):
                        p.uniform_(0.5, 1.5)
    return m.to(dtype).eval()


# ---- heterogeneous specs ---------------------------------------------------------------------------------
def hetero_reference_spec() -> ModelSpec:
    """48 -> 24 wide, vocab 61: GQA, per-layer head counts and sizes, attention and MLP shortcut matrices,
    an MLP-only replacement block that narrows the residual, an attention-only layer. Checked against
    a plain fp64 per-layer reference and used for the checkpoint format."""
    L = LayerSpec
    layers = (
        L(d_in=48, d_mid=48, d_out=48, n_heads=6, n_kv_heads=2, head_dim=8, d_ffn=80),
        L(d_in=48, d_mid=40, d_out=40, n_heads=2, n_kv_heads=1, head_dim=16, d_ffn=24, attn_shortcut=True),
        L(d_in=40, d_mid=40, d_out=32, has_attn=False, d_ffn=56, kind="mlp", mlp_shortcut=True),
        L(d_in=32, d_mid=32, d_out=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ffn=16, has_mlp=False),
        L(d_in=32, d_mid=24, d_out=24, n_heads=3, n_kv_heads=3, head_dim=8, d_ffn=40, attn_shortcut=True),
    )
    return ModelSpec(vocab_size=61, d_model=48, layers=layers, norm_eps=1e-5, rope_theta=500.0).validate()


def hetero_runtime_spec(**fields: Any) -> ModelSpec:
    """64 -> 40 wide, vocab 300: different heads / KV heads / head dims (16, 10, 8) / FFN widths per layer,
    a replacement MLP block, a SliceGPT-style width change with shortcut matrices, and an attention-only
    layer; ``fields`` sets other ModelSpec fields. The decode runtimes' test model."""
    L = LayerSpec
    layers = (
        L(d_in=64, d_mid=64, d_out=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=96),
        L(d_in=64, d_mid=48, d_out=48, n_heads=3, n_kv_heads=1, head_dim=16, d_ffn=80, attn_shortcut=True),
        L(d_in=48, d_mid=48, d_out=48, d_ffn=70, has_attn=False, kind="mlp"),
        L(d_in=48, d_mid=48, d_out=48, n_heads=6, n_kv_heads=3, head_dim=10, has_mlp=False),
        L(d_in=48, d_mid=48, d_out=40, n_heads=2, n_kv_heads=2, head_dim=8, d_ffn=50, mlp_shortcut=True),
    )
    base: dict[str, Any] = dict(vocab_size=300, d_model=64, layers=layers, max_position=256)
    base.update(fields)
    return ModelSpec(**base).validate()


# hetero_runtime_spec with each family's attention features: the runtimes are checked on every one
RUNTIME_SPECS = {
    "hetero": hetero_runtime_spec(),
    "qk_norm+bias": hetero_runtime_spec(qk_norm=True, qkv_bias=True, arch="qwen3"),
    "sliding+llama3rope": hetero_runtime_spec(sliding_window=5, rope_type="llama3", rope_factor=8.0,
                                              rope_original_max_pos=64, arch="mistral"),
    "yarn": hetero_runtime_spec(rope_type="yarn", rope_factor=4.0, rope_original_max_pos=32,
                                rope_attention_factor=1.25),
}


def hetero_calib_spec() -> ModelSpec:
    """24 -> 20 wide, vocab 50: widths change (shortcuts), an MLP-only block, an attention-only block;
    calibration gives pairs of unequal width NaN."""
    L = LayerSpec
    layers = (
        L(d_in=24, d_mid=24, d_out=24, n_heads=4, n_kv_heads=2, head_dim=6, d_ffn=40),
        L(d_in=24, d_mid=20, d_out=20, n_heads=2, n_kv_heads=1, head_dim=8, d_ffn=24, attn_shortcut=True),
        L(d_in=20, d_mid=20, d_out=20, has_attn=False, d_ffn=28, kind="mlp"),
        L(d_in=20, d_mid=20, d_out=20, n_heads=2, n_kv_heads=2, head_dim=6, has_mlp=False),
    )
    return ModelSpec(vocab_size=50, d_model=24, layers=layers, rope_theta=100.0).validate()


def smollm2_vocab_spec(n_layers: int = 3, **fields: Any) -> ModelSpec:
    """64 wide with the SmolLM2 tokenizer's vocabulary (tied): two decoder layers of different head
    counts and sizes, then an MLP replacement block; the first ``n_layers`` of them. For generation and
    serving tests that need a real tokenizer."""
    layers = (LayerSpec(64, 64, 64, 4, 2, 16, 128), LayerSpec(64, 64, 64, 2, 1, 32, 96),
              LayerSpec(64, 64, 64, d_ffn=80, has_attn=False, kind="mlp"))
    return ModelSpec(vocab_size=SMOLLM2_VOCAB, d_model=64, layers=layers[:n_layers], tie_embeddings=True,
                     **fields).validate()


# ---- tiny Hugging Face models ----------------------------------------------------------------------------
HF_FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3-yarn"]


def tiny_hf(family: str, *, seed: int = 0, tie: bool = False, **over: Any) -> Any:
    """A random-weight transformers model of ``family`` (vocab 97, 64 wide, 3 layers, GQA), eager attention,
    fp32, norms U(0.5, 1.5) and biases N(0, 0.1); ``over`` sets other config fields."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

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
    elif family == "qwen3-yarn":  # (as Qwen3 and DeepSeek-R1-0528-Qwen3 ship it; a short pretraining context)
        cfg = Qwen3Config(**base, head_dim=24, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}, **over)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj; Phi3Config's own special tokens are outside vocab 97
        cfg = Phi3Config(**{**base, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                            **over})
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


def to_layerfold(hf: Any) -> Model:
    """The layerfold model of a transformers model (its config and a copy of its weights)."""
    spec = spec_from_hf_config(hf.config)
    state = state_from_hf({k: v.clone() for k, v in hf.state_dict().items()}, spec)
    return layerfold.build_model(spec, state).eval()


def server_model(seed: int = 1) -> Model:
    """The server tests' model: two layers with the embedded tokenizer's vocabulary, 2048 positions."""
    return tiny_model(smollm2_vocab_spec(n_layers=2, max_position=2048), seed=seed)
