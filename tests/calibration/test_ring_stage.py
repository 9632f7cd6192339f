"""The window ring read through its staging buffer (the path a GPU takes when the ring lives in pinned host
memory or on disk) gives the same statistics as reading the ring in place; and the default device budget
for the buffers grows with the GPU."""

from __future__ import annotations

import pytest
import torch

from layerfold.calibration import buffers
from layerfold.calibration import calibrate as C
from tests.support.models import hetero_calib_spec, tiny_model


def test_staged_ring_reads_give_the_same_statistics(monkeypatch) -> None:
    m = tiny_model(hetero_calib_spec(), norm_gains=True)  # per-layer widths: slots narrower than the ring
    ids = torch.randint(0, 50, (7, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    kw = dict(mask=mask, window=4, cka_tokens=12, micro_batch=3, ring_dtype=torch.float32)  # 3 + 3 + 1 samples
    ref = C.calibrate(m, ids, **kw)
    init, staged = C._Run.__init__, []

    def forced(self, *a, **k):
        init(self, *a, **k)
        self.stage_ring = True
        staged.append(self)

    monkeypatch.setattr(C._Run, "__init__", forced)
    got = C.calibrate(m, ids, **kw)
    assert staged and staged[0].ring_stage is not None  # the stage was used
    torch.testing.assert_close(got.cos_window, ref.cos_window, rtol=0, atol=0, equal_nan=True)
    for key, t in ref.tensors().items():
        torch.testing.assert_close(got.tensors()[key], t, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize(("free", "total", "ring_on_device"), [
    (130e9, 143e9, True),  # an H200: 15% of its memory holds the 7B shape's 8.6 GB ring (64 x 2048 tokens)
    (6e9, 8e9, False),     # a small GPU keeps the 4 GiB floor
    (9e9, 143e9, False),   # a big GPU mostly in use: at most half of what is free
])
def test_default_device_budget_grows_with_the_gpu(monkeypatch, free, total, ring_on_device) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(total)))
    dev = torch.device("cuda", 0)
    budget = buffers.default_device_budget(dev)
    assert buffers.DEFAULT_DEVICE_BUDGET <= budget <= max(buffers.DEFAULT_DEVICE_BUDGET, free / 2)
    sizes = {"cka": 138_412_032, "hidden": 1 << 30, "ring": 8 << 30}
    where = buffers.place(sizes, dev, "host", None)
    assert where["hidden"] == "device"
    assert (where["ring"] == "device") is ring_on_device
    assert buffers.place(sizes, dev, "host", 0)["hidden"] != "device"  # an explicit budget still rules
    assert buffers.default_device_budget(torch.device("cpu")) == buffers.DEFAULT_DEVICE_BUDGET
