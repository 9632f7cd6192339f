"""channel_stats and swiglu_channel_stats (Triton, interpreted) against references in fp64."""

from __future__ import annotations

import pytest
import torch

from layerfold.kernels import channel_stats, channel_stats_ref, swiglu_channel_stats, swiglu_channel_stats_ref
from tests.support.inputs import DTYPES, MASKS, make_mask, make_x, poison_padding, zeros64
from tests.support.tolerances import assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("n", [1, 33, 130])
@pytest.mark.parametrize("c", [7, 96, 130])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_channel_stats_match_ref(
    swiglu: bool, c: int, n: int, mask_kind: str, dtype: torch.dtype
) -> None:
    x = make_x((n, c), dtype, seed=c + n, offset=-0.3)
    up = make_x((n, c), dtype, seed=c + n + 1)
    mask = make_mask(mask_kind, n, seed=n)
    if swiglu:
        got = swiglu_channel_stats(poison_padding(x, mask), poison_padding(up, mask), mask)
        want = swiglu_channel_stats_ref(x.double(), up.double(), mask, zeros64((c,), (c,)))
    else:
        got = channel_stats(poison_padding(x, mask), mask)
        want = channel_stats_ref(x.double(), mask, zeros64((c,), (c,)))
    tag = f"c={c} n={n} mask={mask_kind}"
    assert_close(got[0], want[0], torch.float32, f"abs_sum {tag}")
    assert_close(got[1], want[1], torch.float32, f"sq_sum {tag}")


def test_channel_stats_streaming_equals_one_shot() -> None:
    c, sizes = 50, [7, 130, 1, 64]
    gs = [make_x((n, c), torch.bfloat16, seed=i) for i, n in enumerate(sizes)]
    us = [make_x((n, c), torch.bfloat16, seed=20 + i) for i, n in enumerate(sizes)]
    ms = [make_mask("random", n, seed=i) for i, n in enumerate(sizes)]
    acc = None
    for g, u, m in zip(gs, us, ms, strict=True):
        acc = swiglu_channel_stats(g, u, m, acc)
    one = swiglu_channel_stats(torch.cat(gs), torch.cat(us), torch.cat(ms))
    for a, o, name in zip(acc, one, ("abs_sum", "sq_sum"), strict=True):
        assert_close(a, o, torch.float32, f"{name} streamed vs one shot")


def test_channel_stats_3d_strided_and_in_place() -> None:
    b, t, c = 2, 13, 40
    big = make_x((b, t, 2 * c), torch.float16, seed=5)
    x = big[..., c:]  # row-strided view of a fused projection output
    mask = make_mask("random", b * t, seed=5).reshape(b, t)
    acc = (torch.ones(c), torch.ones(c))
    out = channel_stats(x, mask, acc)
    assert out[0] is acc[0] and out[1] is acc[1]
    want = channel_stats_ref(x.double().reshape(-1, c), mask.reshape(-1), zeros64((c,), (c,)))
    assert_close(out[0], want[0] + 1, torch.float32, "abs_sum 3-D")
    assert_close(out[1], want[1] + 1, torch.float32, "sq_sum 3-D")


def test_swiglu_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        swiglu_channel_stats(torch.zeros(4, 8), torch.zeros(4, 9))
