"""Peak memory of slice_model: one layer's working set at a time, not the whole model's.

On an H200, dynamic slicing of a Llama-2-7B-shaped bf16 model (13.8 GB) peaked at 84.5 GB on the device:
every layer's rotated and sliced weights were kept in float64 until the end, then copied once more in the
model's dtype. These tests count the bytes of live tensor storages created during slicing (a dispatch
mode sees every tensor an aten op returns; a finalizer on its storage sees it freed) on a CPU model and
bound the peak by the sliced model's own bytes plus a few dense layers.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from layerfold.methods.slicing import make_plan
from layerfold.surgery.slicing import slice_model
from tests.support.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under the mode and still alive: ``now`` and ``peak``."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if s._cdata not in given or s._cdata in self.sizes:  # not a view of a tensor made before the mode
                    self._see(s)
        return out

    def _see(self, s: torch.UntypedStorage) -> None:
        key, n = s._cdata, s.nbytes()
        old = self.sizes.get(key)
        if old is None:  # a new storage (views and in-place results share a seen one)
            weakref.finalize(s, self._free, key)
        if old is None or n > old:  # (a resized out= storage grows)
            self.sizes[key] = n
            self.now += n - (old or 0)
            self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)


def nbytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_tracker_counts_allocations_views_and_frees() -> None:
    pre = torch.zeros(10, 10)
    with LiveBytes() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        v = a[:10]  # a view: no new storage
        b = a.double() * 2  # 8000 (+ 8000 for the temporary double(), freed)
        del a
        assert mem.now == 12000  # the view keeps a's storage alive
        del v
        assert mem.now == 8000
        del b
        c = pre[2:].T.detach()  # views and in-place results of a tensor made before the mode are not counted
        c.mul_(2)
        assert mem.now == 0
    assert mem.now == 0 and mem.peak == 4000 + 8000 + 8000


@pytest.mark.parametrize("keep_ends", [True, False])
def test_slicing_peak_is_the_sliced_model_plus_a_few_layers(keep_ends: bool) -> None:
    """8 layers 256 wide (a layer: 0.46M parameters, 1.75 MiB in fp32). Before the fix the float64 copies of
    every sliced layer (2x the sliced model) lived until the end beside its model-dtype copies: the peak was
    the sliced model + 18 layers; now + 3 (float64 bases and one matrix's float64 copies, d x d at this
    width being 0.3 layer, as at the 7B shape)."""
    m = tiny_model(n_layers=8, d_model=256, heads=4, kv_heads=4, ffn=256, vocab=128, tie=True, seed=0)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    plan = make_plan(m.spec, 0.25, lr=[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4], base=0.0, keep_ends=keep_ends,
                     pca_tokens="all")
    layer = nbytes(m.layers[0].state_dict().values())
    dense = nbytes(m.state_dict().values())
    with LiveBytes() as mem:
        s, _ = slice_model(m, ids, plan, batch_size=4)
    shared = {t.untyped_storage()._cdata for t in m.state_dict().values()}  # a kept tied embedding
    sliced = nbytes(t for t in s.state_dict().values() if t.untyped_storage()._cdata not in shared)
    assert 0.4 * dense < sliced < dense
    extra = (mem.peak - sliced) / layer
    assert mem.now >= sliced  # the sliced model is still alive
    # the embedding (128 x 256) is 0.07 layer
    assert extra < 4, f"peak {mem.peak / 2**20:.1f} MiB = sliced model {sliced / 2**20:.1f} MiB + {extra:.1f} layers"
