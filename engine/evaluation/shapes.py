"""Random-weight models of real shapes, and the pruned shapes each method makes of them.

The GPU benchmarks run these (no download, no calibration): what a decode step costs depends on the
shapes alone. ``pruned_shapes(llama7b_spec())`` gives, for Llama-2-7B's 32 layers:

- ``shortgpt``: 8 layers dropped (24 plain decoder layers);
- ``streamline``: a window of 8 layers replaced by one MLP block of the model's FFN width (25 layers);
- ``dynamic-slicing``: 25% mean slicing with per-layer widths from a Llama-like redundancy profile
  (low for the first and last layers), every residual point rotated (two shortcut matrices a layer),
  widths rounded to ``round_to``;
- ``come``: per-layer FFN widths and KV heads (25% less in the middle layers, by the same profile),
  widths rounded to ``round_to``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from layerfold.core.model import Model
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.surgery.depth import mlp_block_spec
from layerfold.surgery.slice_plan import SlicePlan, dynamic_fractions, plan_widths, sliced_spec

__all__ = ["SHAPES", "llama13b_spec", "llama7b_spec", "pruned_shapes", "random_model", "redundancy_profile"]

SHAPES = ("shortgpt", "streamline", "dynamic-slicing", "come")


def llama7b_spec(vocab_size: int = 32000) -> ModelSpec:
    """Llama-2-7B's shapes (32 layers, d 4096, 32 heads of 128, FFN 11008, vocab 32000)."""
    layer = LayerSpec(4096, 4096, 4096, n_heads=32, n_kv_heads=32, head_dim=128, d_ffn=11008)
    return ModelSpec(vocab_size=vocab_size, d_model=4096, layers=(layer,) * 32, norm_eps=1e-5, max_position=4096,
                     bos_token_id=1, eos_token_ids=(2,))


def llama13b_spec() -> ModelSpec:
    """Llama-2-13B's shapes (40 layers, d 5120, 40 heads of 128, FFN 13824)."""
    layer = LayerSpec(5120, 5120, 5120, n_heads=40, n_kv_heads=40, head_dim=128, d_ffn=13824)
    return ModelSpec(vocab_size=32000, d_model=5120, layers=(layer,) * 40, norm_eps=1e-5, max_position=4096,
                     bos_token_id=1, eos_token_ids=(2,))


def redundancy_profile(n_layers: int) -> list[float]:
    """A Layer Redundancy curve shaped like Llama's (cos(h_i, h_{i+1}): the first layers and the last
    change the residual most, the middle little): 0.95 - 0.6 e^{-i} - 0.3 e^{-(L-1-i)}."""
    return [0.95 - 0.6 * math.exp(-i) - 0.3 * math.exp(-(n_layers - 1 - i)) for i in range(n_layers)]


def _round(x: float, multiple: int, lo: int) -> int:
    return max(lo, multiple * round(x / multiple))


def pruned_shapes(dense: ModelSpec, *, removed: int | None = None, fraction: float = 0.25,
                  round_to: int = 128) -> dict[str, ModelSpec]:
    """The pruned specs of the module docstring for a uniform ``dense`` spec (see SHAPES)."""
    L = dense.n_layers
    k = removed if removed is not None else L // 4
    layers = list(dense.layers)
    start = L - k - 3  # the late-middle window real calibrations pick; the shape does not depend on which
    out = {"shortgpt": dense.with_layers(layers[:start] + layers[start + k:]),
           "streamline": dense.with_layers(layers[:start] + [mlp_block_spec(layers[start])] + layers[start + k:])}
    fr = dynamic_fractions(redundancy_profile(L), fraction, base=0.1)
    plan = SlicePlan(widths=plan_widths(dense, fr, multiple=round_to, exact_mean=True), round_to=round_to)
    out["dynamic-slicing"] = sliced_spec(dense, plan)
    come = []
    for l, f in zip(layers, fr, strict=True):
        kv = max(1, round(l.n_kv_heads * (1 - f)))
        heads = kv * l.group_size
        come.append(replace(l, n_heads=heads, n_kv_heads=kv, d_ffn=_round((1 - f) * l.d_ffn, round_to, round_to)))
    out["come"] = dense.with_layers(come)
    return out


def random_model(spec: ModelSpec, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Model:
    """``spec`` with N(0, 0.02) weights and unit norms, built on ``device`` in ``dtype`` directly."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        with torch.device(device), torch.no_grad():
            m = Model(spec)
            for name, p in m.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)
    finally:
        torch.set_default_dtype(old)
    return m.eval()
