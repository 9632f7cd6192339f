"""The one Model against HF transformers (fp32 parity) and against a plain per-layer reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layerfold
from layerfold.core.model import KVCache
from layerfold.core.spec import ModelSpec
from tests.support.models import HF_FAMILIES, hetero_reference_spec, tiny_hf, tiny_model, to_layerfold
from tests.support.tolerances import assert_close


@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_parity_with_hf_tiny(family, tie):
    hf = tiny_hf(family, tie=tie)
    lf = to_layerfold(hf)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = lf(ids)
    assert_close(got, ref, torch.float32, f"{family} logits vs transformers")


@pytest.mark.parametrize("first_windowed,window", [(0, 8), (3, None)])
def test_qwen_sliding_window_from_max_window_layers(first_windowed: int, window: int | None) -> None:
    """Qwen2 applies use_sliding_window from layer max_window_layers on: all layers (0) or none (3 of 3)."""
    hf = tiny_hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=first_windowed)
    lf = to_layerfold(hf)
    assert lf.spec.sliding_window == window
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(lf(ids), hf(ids).logits, torch.float32, f"qwen2 window from layer {first_windowed}")


def test_qwen_window_on_some_layers_only_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layers 1\.\.2 \(2 of 3\) attend through a sliding window of 8.*Fix"):
        to_layerfold(tiny_hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1))


def test_family_features_are_used():
    assert to_layerfold(tiny_hf("qwen2")).spec.qkv_bias
    assert to_layerfold(tiny_hf("qwen3")).spec.qk_norm
    assert to_layerfold(tiny_hf("mistral")).spec.sliding_window == 8
    assert to_layerfold(tiny_hf("llama3")).spec.rope_type == "llama3"
    yarn = to_layerfold(tiny_hf("qwen3-yarn")).spec
    assert (yarn.rope_type, yarn.rope_factor, yarn.rope_original_max_pos) == ("yarn", 4.0, 32)
    assert yarn.rope_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    from layerfold.core.arch import spec_from_hf_config

    yarn_cfg = {"type": "yarn", "original_max_position_embeddings": 32}
    cfg = {**tiny_hf("qwen3").config.to_dict(), "rope_scaling": yarn_cfg}
    cfg.pop("rope_parameters", None)
    assert spec_from_hf_config(cfg).rope_factor == 128 / 32  # no factor (older, DeepSeek-style configs): the ratio


@pytest.mark.parametrize("scaling,factor,attn", [
    ({"factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 0.7}, 4.0, 0.7),
    ({"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.5, "mscale_all_dim": 1.0,
      "beta_fast": 16, "beta_slow": 2, "truncate": False}, 4.0, (0.05 * math.log(4.0) + 1) / (0.1 * math.log(4.0) + 1)),
])
def test_yarn_settings_match_transformers(scaling: dict, factor: float, attn: float) -> None:
    """Each YaRN setting HF reads (attention_factor, mscale / mscale_all_dim, beta_fast/slow, truncate, a factor
    left out) gives transformers' logits, and survives an HF export read back by transformers."""
    from layerfold.core.arch import rope_scaling

    hf = tiny_hf("qwen3", rope_scaling={"rope_type": "yarn", **scaling})
    lf = to_layerfold(hf)
    assert lf.spec.rope_factor == pytest.approx(factor) and lf.spec.rope_attention_factor == pytest.approx(attn)
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(lf(ids), hf(ids).logits, torch.float32, f"yarn {scaling} vs transformers")
    again = to_layerfold(tiny_hf("qwen3", rope_scaling=rope_scaling(lf.spec)))
    assert again.spec == lf.spec


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_kv_cache_matches_full_forward(family):
    lf = to_layerfold(tiny_hf(family))
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lf(ids)
        cache = KVCache.allocate(lf.spec, 2, 32, "cpu", torch.float32)
        parts = [lf(ids[:, :10], cache=cache)] + [lf(ids[:, t:t + 1], cache=cache) for t in range(10, 24)]
    assert_close(torch.cat(parts, 1), full, torch.float32, f"{family} cached steps vs full forward")


def test_padding_mask_left_padded_equals_unpadded():
    lf = to_layerfold(tiny_hf("llama"))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    pad = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = lf(ids)
        b = lf(pad, key_valid=valid)[:, 5:]
    assert_close(b, a, torch.float32, "left-padded vs unpadded")


@pytest.mark.slow
def test_parity_smollm2_135m():
    from transformers import AutoModelForCausalLM

    from layerfold.core.loading import resolve_alias

    path = resolve_alias("smollm2-135m")
    model, tok = layerfold.load("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok("def add(a, b):\n    return a + b  # The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, torch.float32, "smollm2-135m logits vs transformers")


# ---- a heterogeneous spec against a plain per-layer reference written here --------------------------------
def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _ref_forward(sd: dict, spec: ModelSpec, ids: torch.Tensor) -> torch.Tensor:
    """Straight-line float64 reference: one explicit loop over layers, heads and positions."""
    sd = {k: v.double() for k, v in sd.items()}
    h = sd["embed.weight"][ids]  # (B, T, d)
    B, T, _ = h.shape
    for i, l in enumerate(spec.layers):
        p = f"layers.{i}."
        if l.has_attn:
            x = _rms(h, sd[p + "attn_norm.weight"], spec.norm_eps)
            q = (x @ sd[p + "attn.q.weight"].T).view(B, T, l.n_heads, l.head_dim)
            k = (x @ sd[p + "attn.k.weight"].T).view(B, T, l.n_kv_heads, l.head_dim)
            v = (x @ sd[p + "attn.v.weight"].T).view(B, T, l.n_kv_heads, l.head_dim)
            half = l.head_dim // 2
            inv = spec.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / l.head_dim)
            ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, half)
            cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

            def rot(z, half=half, cos=cos, sin=sin):
                a, b = z[..., :half], z[..., half:]
                return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

            q, k = rot(q), rot(k)
            out = torch.zeros(B, T, l.n_heads, l.head_dim, dtype=torch.float64)
            for hh in range(l.n_heads):
                kv = hh // (l.n_heads // l.n_kv_heads)
                s = q[:, :, hh] @ k[:, :, kv].transpose(1, 2) / math.sqrt(l.head_dim)  # (B, T, T)
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                out[:, :, hh] = s.softmax(-1) @ v[:, :, kv]
            a = out.reshape(B, T, -1) @ sd[p + "attn.o.weight"].T
            res = h @ sd[p + "attn_shortcut.weight"].T if l.attn_shortcut else h
            h = res + a
        if l.has_mlp:
            x = _rms(h, sd[p + "mlp_norm.weight"], spec.norm_eps)
            act = F.silu(x @ sd[p + "mlp.gate.weight"].T) * (x @ sd[p + "mlp.up.weight"].T)
            m = act @ sd[p + "mlp.down.weight"].T
            res = h @ sd[p + "mlp_shortcut.weight"].T if l.mlp_shortcut else h
            h = res + m
    head = sd["embed.weight"] if spec.tie_embeddings else sd["lm_head.weight"]
    return _rms(h, sd["norm.weight"], spec.norm_eps) @ head.T


def test_heterogeneous_spec_matches_reference():
    spec = hetero_reference_spec()
    m = tiny_model(spec, std=0.2, norm_gains=True)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(ids).double()
    ref = _ref_forward(m.state_dict(), spec, ids)
    assert_close(got, ref, torch.float32, "forward vs fp64 reference")
    # and with a cache, token by token
    with torch.no_grad():
        cache = KVCache.allocate(spec, 2, 9, "cpu", torch.float32)
        steps = torch.cat([m(ids[:, t:t + 1], cache=cache) for t in range(9)], 1).double()
    assert_close(steps, ref, torch.float32, "cached steps vs fp64 reference")
