"""gram_accumulate (Triton, interpreted) against its reference in fp64."""

from __future__ import annotations

import pytest
import torch

from layerfold.kernels import gram_accumulate, gram_accumulate_ref
from tests.support.inputs import DTYPES, MASKS, make_mask, make_x, poison_padding, zeros64
from tests.support.tolerances import assert_close


def _ref64(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    d = x.shape[-1]
    return gram_accumulate_ref(x.double(), mask, zeros64((d, d), (d,), (d,)))


def _check(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tag: str) -> None:
    for g, w, name in zip(got, want, ("G", "s", "ss"), strict=True):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32, f"{name} {tag}")  # fp32 accumulators, whatever the input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("n", [1, 33, 130])
@pytest.mark.parametrize("d", [7, 72, 100, 130])
def test_gram_matches_ref(d: int, n: int, mask_kind: str, dtype: torch.dtype) -> None:
    x = make_x((n, d), dtype, seed=d * 1000 + n)
    mask = make_mask(mask_kind, n, seed=n)
    got = gram_accumulate(poison_padding(x, mask), mask)
    _check(got, _ref64(x, mask), f"d={d} n={n} mask={mask_kind}")


def test_gram_medium() -> None:
    x = make_x((300, 576), torch.bfloat16, seed=1)
    mask = make_mask("random", 300, seed=1)
    _check(gram_accumulate(x, mask), _ref64(x, mask), "medium")


def test_gram_streaming_equals_one_shot() -> None:
    d, sizes = 40, [5, 64, 1, 97, 33]
    xs = [make_x((n, d), torch.float16, seed=i) for i, n in enumerate(sizes)]
    ms = [make_mask("random", n, seed=i) for i, n in enumerate(sizes)]
    acc = None
    for x, m in zip(xs, ms, strict=True):
        acc = gram_accumulate(x, m, acc)
    one = gram_accumulate(torch.cat(xs), torch.cat(ms))
    _check(acc, one, "streamed vs one shot")
    _check(acc, _ref64(torch.cat(xs), torch.cat(ms)), "streamed vs ref")


def test_gram_acc_in_place_and_3d_input() -> None:
    b, t, d = 3, 11, 20
    x = make_x((b, t, d), torch.float32, seed=3)
    mask = make_mask("random", b * t, seed=3).reshape(b, t)
    acc = (torch.ones(d, d), torch.ones(d), torch.ones(d))
    out = gram_accumulate(x, mask, acc)
    assert all(o is a for o, a in zip(out, acc, strict=True))
    want = _ref64(x.reshape(-1, d), mask.reshape(-1))
    _check(out, tuple(w + 1 for w in want), "3-D input into ones")


@pytest.mark.parametrize("layout", ["column_strided", "row_strided", "transposed"])
def test_gram_non_contiguous(layout: str) -> None:
    base = make_x((50, 80), torch.float32, seed=4)
    x = {"column_strided": base[:, ::2], "row_strided": base[:, 10:50],
         "transposed": base[:40, :40].T}[layout]
    _check(gram_accumulate(x), _ref64(x, None), layout)


def test_gram_numeric_mask_equals_bool_mask() -> None:
    x = make_x((40, 24), torch.float32, seed=5)
    mask = make_mask("random", 40, seed=5)
    _check(gram_accumulate(x, mask.float()), gram_accumulate(x, mask), "0/1 mask")
