"""Random-weight models of real shapes: what the GPU benchmarks run without downloading anything."""

from __future__ import annotations

import torch

from layerfold.core.model import Model
from layerfold.core.spec import LayerSpec, ModelSpec

__all__ = ["llama7b_spec", "random_model"]


def llama7b_spec() -> ModelSpec:
    """Llama-2-7B's shapes (32 layers, d 4096, 32 heads of 128, FFN 11008, vocab 32000)."""
    layer = LayerSpec(4096, 4096, 4096, n_heads=32, n_kv_heads=32, head_dim=128, d_ffn=11008)
    return ModelSpec(vocab_size=32000, d_model=4096, layers=(layer,) * 32, norm_eps=1e-5, max_position=4096,
                     bos_token_id=1, eos_token_ids=(2,))


def random_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Model:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            m = Model(spec)
            for name, p in m.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    finally:
        torch.set_default_dtype(old)
    return m.eval()
