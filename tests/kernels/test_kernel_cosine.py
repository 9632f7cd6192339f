"""cosine_window_sum (Triton, interpreted) against its reference in fp64."""

from __future__ import annotations

import pytest
import torch

from layerfold.kernels import (
    COS_EPS,
    cosine_pairs_ref,
    cosine_window_sum,
    cosine_window_sum_ref,
    unit_rows,
    unit_rows_ref,
)
from tests.support.inputs import DTYPES, MASKS, make_mask, make_x, poison_padding
from tests.support.tolerances import assert_close


def _ref64(base: torch.Tensor, others: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    acc = torch.zeros(others.shape[0], dtype=torch.float64)
    return cosine_window_sum_ref(base.double(), others.double(), mask, acc)


def _others(base: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    # Correlated with base, as consecutive hidden states are, so cosines are far from 0.
    noise = make_x((k, *base.shape), torch.float32, seed=seed, offset=0.0)
    return (base.float()[None] + 0.7 * noise).to(base.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("n", [1, 33, 130])
@pytest.mark.parametrize(("d", "k"), [(7, 1), (100, 3), (130, 9)])
def test_cosine_matches_ref(d: int, k: int, n: int, mask_kind: str, dtype: torch.dtype) -> None:
    base = make_x((n, d), dtype, seed=d + n)
    others = _others(base, k, seed=k + n)
    mask = make_mask(mask_kind, n, seed=n)
    got = cosine_window_sum(poison_padding(base, mask), poison_padding(others, mask), mask)
    assert got.dtype == torch.float32 and got.shape == (k,)
    assert_close(got, _ref64(base, others, mask), torch.float32, f"d={d} k={k} n={n} mask={mask_kind}")


def test_cosine_streaming_equals_one_shot() -> None:
    d, k, sizes = 48, 4, [3, 70, 1, 33]
    bases = [make_x((n, d), torch.bfloat16, seed=i) for i, n in enumerate(sizes)]
    others = [_others(b, k, seed=10 + i) for i, b in enumerate(bases)]
    masks = [make_mask("random", n, seed=i) for i, n in enumerate(sizes)]
    acc = None
    for b, o, m in zip(bases, others, masks, strict=True):
        acc = cosine_window_sum(b, o, m, acc)
    base, oth, mask = torch.cat(bases), torch.cat(others, dim=1), torch.cat(masks)
    assert_close(acc, cosine_window_sum(base, oth, mask), torch.float32, "streamed vs one shot")
    assert_close(acc, _ref64(base, oth, mask), torch.float32, "streamed vs ref")


def test_cosine_known_values_and_eps() -> None:
    base = make_x((20, 16), torch.float32, seed=1)
    others = torch.stack([base, -base, 3.0 * base, torch.zeros_like(base)])
    got = cosine_window_sum(base, others)
    assert_close(got, torch.tensor([20.0, -20.0, 20.0, 0.0], dtype=torch.float64), torch.float32, "known")
    # A zero vector has cosine 0 (eps floor on the product of norms), not nan.
    z = cosine_pairs_ref(torch.zeros(3, 5), torch.ones(3, 5))
    assert torch.equal(z, torch.zeros(3)) and COS_EPS == 1e-12


def test_cosine_3d_input_and_acc_in_place() -> None:
    b, t, d, k = 2, 9, 24, 3
    base = make_x((b, t, d), torch.float16, seed=2)
    others = _others(base, k, seed=3)
    mask = make_mask("random", b * t, seed=2).reshape(b, t)
    acc = torch.full((k,), 2.0)
    out = cosine_window_sum(base, others, mask, acc)
    assert out is acc
    want = _ref64(base.reshape(-1, d), others.reshape(k, -1, d), mask.reshape(-1)) + 2.0
    assert_close(out, want, torch.float32, "3-D input")


def test_cosine_non_contiguous() -> None:
    big = make_x((3, 40, 64), torch.float32, seed=4)
    base, others = big[0, :, ::2], big[1:, :, 1::2]  # channel-strided: copied
    assert_close(cosine_window_sum(base, others), _ref64(base, others, None), torch.float32, "strided")
    base, others = big[0, :, :20], big[1:, :, 20:40]  # row-strided: read in place
    assert_close(cosine_window_sum(base, others), _ref64(base, others, None), torch.float32, "rows")


def test_cosine_rejects_mismatched_others() -> None:
    with pytest.raises(ValueError, match="others must be"):
        cosine_window_sum(torch.zeros(4, 8), torch.zeros(2, 5, 8))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (33, 100), (2, 5, 130)])
def test_unit_rows_matches_ref(shape: tuple[int, ...], dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    x = make_x(shape, dtype, seed=3)
    x[..., 0, :] = 0  # a zero row (padding) comes out zero, not nan
    got = unit_rows(x, out_dtype)
    assert got.dtype == out_dtype and got.shape == x.shape
    want = unit_rows_ref(x.double(), out_dtype)
    torch.testing.assert_close(got, want, atol=1e-3 if out_dtype == torch.float16 else 1e-6, rtol=0)
    assert got[..., 0, :].eq(0).all()
    norms = torch.linalg.vector_norm(got[..., 1:, :].double(), dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)


def test_unit_rows_into_a_slice_of_a_wider_buffer() -> None:
    """Calibration writes each layer's directions straight into its window-ring slot: a (n, T, d) slice of a
    (slots, n, T, d_max) buffer, rows d_max apart; the rest of the buffer is left alone."""
    x = make_x((3, 4, 20), torch.bfloat16, seed=4)
    ring = torch.full((2, 5, 4, 32), 7.0, dtype=torch.float16)
    dst = ring[1, 1:4, :, :20]
    assert unit_rows(x, out=dst) is dst
    torch.testing.assert_close(dst, unit_rows_ref(x, torch.float16), atol=1e-3, rtol=0)
    rest = ring.clone()
    rest[1, 1:4, :, :20] = 7.0
    assert rest.eq(7.0).all()
    with pytest.raises(ValueError, match="does not match x"):
        unit_rows(x, out=ring[0, :3, :, :21])
    with pytest.raises(ValueError, match="not evenly strided"):
        unit_rows(x, out=torch.zeros(4, 3, 20, dtype=torch.float16).transpose(0, 1))
