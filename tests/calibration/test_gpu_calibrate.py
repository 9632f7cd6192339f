"""Calibration on the GPU equals calibration on the CPU (fp32), wherever its buffers live. Needs CUDA."""

from __future__ import annotations

import pytest
import torch

from layerfold.calibration.calibrate import calibrate
from layerfold.core.model import build_model
from layerfold.core.spec import LayerSpec, ModelSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
L = LayerSpec


def _model():
    layers = (
        L(d_in=24, d_mid=24, d_out=24, n_heads=4, n_kv_heads=2, head_dim=6, d_ffn=40),
        L(d_in=24, d_mid=20, d_out=20, n_heads=2, n_kv_heads=1, head_dim=8, d_ffn=24, attn_shortcut=True),
        L(d_in=20, d_mid=20, d_out=20, has_attn=False, d_ffn=28, kind="mlp"),
        L(d_in=20, d_mid=20, d_out=20, n_heads=2, n_kv_heads=2, head_dim=6, has_mlp=False),
        L(d_in=20, d_mid=20, d_out=20, n_heads=2, n_kv_heads=2, head_dim=6, d_ffn=32),
    )
    torch.manual_seed(0)
    m = build_model(ModelSpec(vocab_size=50, d_model=24, layers=layers, rope_theta=100.0).validate()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("budget", [None, 0])  # device buffers / pinned host buffers
def test_gpu_statistics_equal_cpu(budget) -> None:
    m = _model()
    ids = torch.randint(0, 50, (6, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = mask[4, :5] = False  # left padding
    kw = dict(mask=mask, window=4, cka_tokens=12, grams=True, micro_batch=4, ring_dtype=torch.float32)
    cpu = calibrate(m, ids, **kw)
    gpu = calibrate(m, ids, device="cuda", device_budget=budget, **kw)
    assert gpu.meta["buffers"]["hidden"] == ("device" if budget is None else "pinned")
    for name in ("cos_window", "cka", "bi"):
        torch.testing.assert_close(getattr(gpu, name), getattr(cpu, name), rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=name)
    for key, t in cpu.tensors().items():
        torch.testing.assert_close(gpu.tensors()[key].double(), t.double(), rtol=1e-4, atol=1e-4, msg=key)
    assert gpu.counts == cpu.counts
