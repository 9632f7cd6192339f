"""Calibration on the GPU equals calibration on the CPU (fp32), wherever its buffers live. Needs CUDA."""

from __future__ import annotations

import pytest
import torch

from layerfold.calibration.calibrate import calibrate
from tests.support.models import hetero_calib_spec, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model():
    return tiny_model(hetero_calib_spec(), norm_gains=True)


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
