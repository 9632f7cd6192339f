"""The rope scaling of a GGUF file reaches the spec (transformers' GGUF reader drops it): llama.cpp's
``rope.scaling.*`` keys and the ``rope_freqs`` tensor of Llama 3.1-3.3, each found exactly or refused."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from layerfold.core.gguf_rope import gguf_rope
from layerfold.core.model import rope_inv_freq
from tests.support.gguf_files import keys_file
from tests.support.models import tiny_spec

gguf = pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")

HD = 64  # Llama-3's head size: 32 frequencies, several on the ramp


def base_spec() -> Any:
    return tiny_spec(d_model=256, n_layers=1, heads=4, kv_heads=2, ffn=64, rope_theta=500000.0, max_position=131072)


def write(path: Path, keys: dict[str, Any], divisors: torch.Tensor | None = None) -> Path:
    full = {f"llama.rope.scaling.{k}": v for k, v in keys.items()}
    return keys_file(path, full, None if divisors is None else {"rope_freqs.weight": divisors.float().numpy()})


def llama3_divisors(spec: Any, **rope: Any) -> torch.Tensor:
    """What llama.cpp's converter writes: plain frequency / scaled frequency, per frequency."""
    plain = rope_inv_freq(spec, HD).double()
    return plain / rope_inv_freq(replace(spec, rope_type="llama3", **rope), HD).double()


@pytest.mark.parametrize("rope", [
    dict(rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192),  # 3.2
    dict(rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192),  # 3.1
    dict(rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=3.0, rope_original_max_pos=3000),  # fitted
])
def test_llama3_rope_freqs_give_the_same_frequencies(tmp_path: Path, rope: dict[str, Any]) -> None:
    spec = base_spec()
    got = gguf_rope(write(tmp_path / "m.gguf", {}, llama3_divisors(spec, **rope)), spec)
    assert got.rope_type == "llama3" and got.rope_factor == rope["rope_factor"]
    want = rope_inv_freq(replace(spec, rope_type="llama3", **rope), HD)
    assert torch.allclose(rope_inv_freq(got, HD), want, rtol=1e-5)


def test_rope_freqs_no_llama3_setting_makes_are_refused(tmp_path: Path) -> None:
    spec = base_spec()
    d = torch.linspace(1, 8, HD // 2) ** 1.5  # smooth, but no Llama-3 ramp
    with pytest.raises(ValueError, match="matches no Llama-3 rope scaling.*Fix: convert the model from its HF"):
        gguf_rope(write(tmp_path / "m.gguf", {}, d), spec)
    with pytest.raises(ValueError, match="not one positive divisor per rotary frequency"):
        gguf_rope(write(tmp_path / "n.gguf", {}, torch.ones(HD)), spec)
    assert gguf_rope(write(tmp_path / "o.gguf", {}, torch.ones(HD // 2)), spec) == spec  # all ones: plain


def test_linear_and_yarn_keys(tmp_path: Path) -> None:
    spec = base_spec()
    lin = gguf_rope(write(tmp_path / "l.gguf", {"type": "linear", "factor": 4.0}), spec)
    assert (lin.rope_type, lin.rope_factor) == ("linear", 4.0)
    y = gguf_rope(write(tmp_path / "y.gguf", {"type": "yarn", "factor": 4.0, "original_context_length": 32768}), spec)
    assert (y.rope_type, y.rope_factor, y.rope_original_max_pos) == ("yarn", 4.0, 32768)
    assert y.rope_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert gguf_rope(write(tmp_path / "n.gguf", {"type": "none"}), spec) == spec
    with pytest.raises(ValueError, match="yarn_log_multiplier.*Fix: convert the model from its HF directory"):
        gguf_rope(write(tmp_path / "d.gguf", {"type": "yarn", "factor": 40.0, "yarn_log_multiplier": 0.1}), spec)
    with pytest.raises(ValueError, match="rope scaling 'longrope'.*not supported.*Fix"):
        gguf_rope(write(tmp_path / "r.gguf", {"type": "longrope", "factor": 4.0}), spec)
