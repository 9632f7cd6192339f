"""Hostile rope-scaling and sliding-window settings: an HF config.json (as transformers 4.x or 5.x writes it, or
edited by hand) and GGUF rope keys. Each gives transformers' (llama.cpp's) model, or a one-line error naming the
setting, its value and the fix, raised before any weight is read; never a traceback from deep inside, a NaN, or a
silently different model."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import layerfold
from layerfold.core.spec import ModelSpec
from tests.support.gguf_files import keys_file
from tests.support.models import tiny_hf, tiny_spec
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

S, F = "sliding_attention", "full_attention"
L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16, "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
IDS = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(0))  # longer than every window here


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def hf_dir(tmp_path: Path, family: str, patch: dict[str, Any], drop: tuple[str, ...] = (),
           weights: bool = True) -> Path:
    """A model directory: the config.json transformers 5 writes for ``tiny_hf(family)``, ``drop`` keys removed and
    ``patch`` applied; its weights, or (``weights`` False) a safetensors file no reader can open."""
    hf = tiny_hf(family)
    cfg = json.loads(hf.config.to_json_string())
    if "rope_parameters" not in cfg:  # transformers 4.x writes rope_theta and rope_scaling: put them as 5.x does
        rs, theta = cfg.pop("rope_scaling", None) or {}, cfg.pop("rope_theta", 10000.0)
        cfg["rope_parameters"] = {**(rs or {"rope_type": "default"}), "rope_theta": theta}
    cfg = without(cfg, *drop)
    cfg.update(patch)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    if weights:
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(d / "model.safetensors"))
    else:  # as large as the weights, so only a reader that opens it notices
        (d / "model.safetensors").write_bytes(b"\xff" * 200_000)
    return d


# name -> (family, config changes, keys dropped, what the refusal must say)
REFUSED: dict[str, tuple[str, dict[str, Any], tuple[str, ...], str]] = {
    "factor without a type": ("llama", {"rope_scaling": {"factor": 4.0}}, ("rope_parameters",),
                              r"factor but no scaling type.*Fix: set rope_type"),
    "partial rotary on a Qwen3": ("qwen3", {"partial_rotary_factor": 0.5}, (),
                                  r"partial_rotary_factor=0.5 rotates only part of each head.*Fix"),
    "rope_type and type disagree": ("llama", {"rope_scaling": {"rope_type": "linear", "type": "yarn", "factor": 4.0}},
                                    ("rope_parameters",), r"rope_type='linear' but type='yarn'.*Fix: keep one"),
    "rope_parameters and rope_scaling disagree": (
        "qwen3-yarn", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, (),
        r"rope_parameters .*yarn.* and rope_scaling .*linear.* disagree"),
    "two rope_thetas": ("llama", {"rope_theta": 500.0}, (), r"rope_theta is given as 10000.0 and 500.0.*Fix: keep one"),
    "rope_parameters a list": ("llama", {"rope_parameters": [1, 2]}, (), r"rope_parameters=\[1, 2\] is not one JSON"),
    "rope_parameters per layer type": ("qwen2", {"rope_parameters": {F: {"rope_type": "default", "rope_theta": 500.0}}},
                                       (), r"rope_parameters=.*per-layer-type entries are not supported.*Fix"),
    "linear without factor": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, (),
                              r"'linear' .* lacks one of factor\. Fix"),
    "llama3 without low_freq_factor": ("llama3", {"rope_parameters": without(L3, "low_freq_factor")}, (),
                                       r"'llama3' .* lacks one of factor, low_freq_factor, high_freq_factor\. Fix"),
    "llama3 original context 0": ("llama3", {"rope_parameters": {**L3, "original_max_position_embeddings": 0}}, (),
                                  r"original_max_position_embeddings=0 is not a context length.*Fix"),
    "yarn original context 0": ("qwen3-yarn", {"rope_parameters": {**YARN, "original_max_position_embeddings": 0}}, (),
                                r"original_max_position_embeddings=0 is not a context length.*Fix"),
    "yarn without factor, original context 0": (
        "qwen3-yarn", {"rope_parameters": {**without(YARN, "factor"), "original_max_position_embeddings": 0}}, (),
        r"original_max_position_embeddings=0 is not a context length.*Fix"),
    "yarn defaults to a missing max_position_embeddings": (
        "qwen3-yarn", {"rope_parameters": without(YARN, "original_max_position_embeddings")},
        ("max_position_embeddings",), r"max_position_embeddings, which the config lacks\. Fix"),
    "yarn with rope_theta 1": ("qwen3-yarn", {"rope_parameters": {**YARN, "rope_theta": 1.0}}, (),
                               r"YaRN rope scaling with rope_theta=1.0 .* no frequency ramp.*Fix"),
    "mistral sliding_window 0": ("mistral", {"sliding_window": 0}, (), r"sliding_window=0 must be positive.*Fix.*null"),
    "qwen2 sliding_window 0": ("qwen2", {"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0},
                               ("layer_types",), r"sliding_window=0 must be positive.*Fix"),
    "layer_types one too many": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                           "layer_types": [S, S, S, F]}, (),
                                 r"layer_types=.* per layer \(num_hidden_layers=3\)\. Fix"),
    "layer_types unknown entries": ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
                                              "layer_types": ["sliding"] * 3}, (), r"layer_types=\['sliding'.*Fix"),
    "layer_types a string": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": S}, (),
                             r"layer_types='sliding_attention' is not one.*Fix"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_setting_is_named_before_the_weights_are_read(tmp_path: Path, case: str) -> None:
    family, patch, drop, match = REFUSED[case]
    d = hf_dir(tmp_path, family, patch, drop, weights=False)
    with pytest.raises(layerfold.CheckpointError, match=match) as e:
        layerfold.load(d, tokenizer=False)
    assert "\n" not in str(e.value) and "Fix" in str(e.value)


# configs transformers reads one way (each of these layerfold used to read another): logits must agree
PARITY: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "rope_parameters with 'type'": ("llama", {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 1e4}},
                                    ()),
    "rope_scaling beside a default rope_parameters": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                                                      ()),
    "llama3 original context from max_position_embeddings": (
        "llama3", {"rope_parameters": without(L3, "original_max_position_embeddings")}, ()),
    "llama ignores use_sliding_window": ("llama", {"use_sliding_window": True, "sliding_window": 4}, ()),
    "an explicit default ignores its factor": (
        "llama", {"rope_parameters": {"rope_type": "default", "factor": 4.0, "rope_theta": 1e4}}, ()),
}


# rope_parameters and llama3's default context are transformers 5's: under 4.x (the floors) the two references differ
_V5_ONLY = {"rope_parameters with 'type'", "llama3 original context from max_position_embeddings"}
_OLD = int(__import__("transformers").__version__.split(".")[0]) < 5


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skipif(_OLD and c in _V5_ONLY, reason="a "
                                                                            "transformers 5 behaviour"))
                                  for c in PARITY])
def test_config_gives_transformers_model(tmp_path: Path, case: str) -> None:
    from transformers import AutoModelForCausalLM

    family, patch, drop = PARITY[case]
    d = hf_dir(tmp_path, family, patch, drop)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager").float().eval()
    lf = layerfold.load(d, tokenizer=False)[0]
    with torch.no_grad():
        assert_close(lf(IDS), hf(IDS).logits, torch.float32, f"{case}: layerfold vs transformers")


def test_layerfold_spec_with_yarn_theta_1_is_refused() -> None:
    """A layerfold checkpoint's spec is checked the same way (YaRN's ramp divides by log(rope_theta))."""
    spec = tiny_spec(rope_type="yarn", rope_factor=4.0, rope_original_max_pos=32, rope_attention_factor=1.1)
    bad = {**spec.to_dict(), "rope_theta": 1.0}
    with pytest.raises(ValueError, match=r"rope_theta=1.0 .* no frequency ramp\. Fix"):
        ModelSpec.from_dict(bad)


# ---- GGUF rope keys ---------------------------------------------------------------------------------
def gguf_file(path: Path, keys: dict[str, Any]) -> Path:
    pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")
    return keys_file(path, keys)


def gguf_spec() -> ModelSpec:
    return tiny_spec(d_model=256, n_layers=1, heads=4, kv_heads=2, ffn=64, rope_theta=500000.0, max_position=131072)


R = "llama.rope.scaling."
GGUF_REFUSED = {
    "linear factor -1": ({R + "type": "linear", R + "factor": -1.0}, r"factor=-1\.0 is not a number > 0"),
    "yarn factor NaN": ({R + "type": "yarn", R + "factor": math.nan}, r"factor=nan is not a number > 0"),
    "yarn without factor": ({R + "type": "yarn"}, r"factor=None is not a number > 0"),
    "yarn beta a string": ({R + "type": "yarn", R + "factor": 4.0, R + "yarn_beta_slow": "x"},
                           r"yarn_beta_slow='x' is not a number > 0"),
    "yarn original context a fraction": ({R + "type": "yarn", R + "factor": 4.0, R + "original_context_length": 32.5},
                                         r"original_context_length=32\.5 is not a whole number"),
}


@pytest.mark.parametrize("case", list(GGUF_REFUSED))
def test_bad_gguf_rope_key_is_named(tmp_path: Path, case: str) -> None:
    from layerfold.core.gguf_rope import gguf_rope

    keys, match = GGUF_REFUSED[case]
    path = gguf_file(tmp_path / "m.gguf", keys)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: llama\.rope\.scaling\.{match}.*Fix: "):
        gguf_rope(path, gguf_spec())


@pytest.mark.parametrize("keys", [{R + "factor": 4.0}, {"llama.rope.scale_linear": 4.0}],
                         ids=["factor without type", "older scale_linear key"])
def test_gguf_factor_without_type_scales_linearly_as_llama_cpp_does(tmp_path: Path, keys: dict[str, Any]) -> None:
    """llama.cpp reads a missing rope.scaling.type as linear and rope.scale_linear as the factor."""
    from layerfold.core.gguf_rope import gguf_rope

    got = gguf_rope(gguf_file(tmp_path / "m.gguf", keys), gguf_spec())
    assert (got.rope_type, got.rope_factor) == ("linear", 4.0)


@pytest.mark.parametrize("kind", ["linear", "yarn", None])
def test_gguf_factor_0_is_no_scaling_as_llama_cpp_reads_it(tmp_path: Path, kind: str | None) -> None:
    from layerfold.core.gguf_rope import gguf_rope

    keys = {R + "factor": 0.0, **({R + "type": kind} if kind else {})}
    assert gguf_rope(gguf_file(tmp_path / "m.gguf", keys), gguf_spec()) == gguf_spec()
