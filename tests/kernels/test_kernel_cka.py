"""Minibatch CKA pieces (Triton, interpreted) against references and a plain fp64 unbiased HSIC."""

from __future__ import annotations

import pytest
import torch

from layerfold.kernels import (
    cka_from_hsic,
    hsic_accumulate,
    hsic_accumulate_ref,
    hsic_row_accumulate,
    hsic_row_accumulate_ref,
    ucentered_gram,
    ucentered_gram_ref,
)
from tests.support.inputs import DTYPES, MASKS, make_mask, make_x, poison_padding
from tests.support.tolerances import assert_close

F32 = torch.float32


def hsic_unbiased_direct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of linear kernels (Song et al. 2012, as in Nguyen et al. 2021), in fp64."""
    k = x.double() @ x.double().T
    l_ = y.double() @ y.double().T
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    n = k.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    trace = torch.trace(k @ l_)
    middle = (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
    last = 2 * (ones @ k) @ (l_ @ ones) / (n - 2)
    return (trace + middle - last) / (n * (n - 3))


def hsic_matrix_direct(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.stack([hsic_unbiased_direct(a, b) for b in xs]) for a in xs])


def hsic_pipeline(xs: list[torch.Tensor], acc: torch.Tensor | None = None) -> torch.Tensor:
    return hsic_accumulate(torch.stack([ucentered_gram(x) for x in xs]), acc)


def _layers(n: int, d: int, n_layers: int, seed: int) -> list[torch.Tensor]:
    """Layer-like representations: each a noisy linear map of the previous one."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g)]
    for _ in range(n_layers - 1):
        w = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d**0.5
        xs.append(xs[-1] @ w + 0.3 * torch.randn(n, d, generator=g))
    return xs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("n", [4, 33, 130])
@pytest.mark.parametrize("d", [7, 100])
def test_ucentered_gram_matches_ref(d: int, n: int, mask_kind: str, dtype: torch.dtype) -> None:
    x = make_x((n, d), dtype, seed=d + n)
    mask = make_mask(mask_kind, n, seed=n)
    m = n if mask is None else int(mask.sum())
    if m < 4:
        with pytest.raises(ValueError, match="at least 4 valid tokens"):
            ucentered_gram(x, mask)
        return
    got = ucentered_gram(poison_padding(x, mask), mask)
    assert got.dtype == F32 and got.shape == (m, m)
    assert torch.all(torch.diagonal(got) == 0)
    assert_close(got, ucentered_gram_ref(x.double(), mask), torch.float32, f"d={d} n={n} mask={mask_kind}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [4, 33, 70])
@pytest.mark.parametrize("n_layers", [1, 3, 17])
def test_hsic_accumulate_matches_ref(n_layers: int, m: int, dtype: torch.dtype) -> None:
    grams = torch.stack([ucentered_gram_ref(x) for x in _layers(m, 12, n_layers, seed=m)]).to(dtype)
    acc = torch.full((n_layers, n_layers), 0.5)
    got = hsic_accumulate(grams, acc)
    assert got is acc
    want = hsic_accumulate_ref(grams.double(), torch.full((n_layers, n_layers), 0.5, dtype=torch.float64))
    assert_close(got, want, torch.float32, f"L={n_layers} m={m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_layers", [0, 1, 5])
@pytest.mark.parametrize("m", [4, 50, 130])
def test_hsic_row_matches_ref(m: int, n_layers: int, dtype: torch.dtype) -> None:
    xs = _layers(m, 10, n_layers + 1, seed=m)
    grams = torch.stack([ucentered_gram_ref(x) for x in xs]).to(dtype)
    got = hsic_row_accumulate(grams[-1], grams[:-1])
    want = hsic_row_accumulate_ref(grams[-1].double(), grams[:-1].double())
    assert got.dtype == F32
    assert_close(got, want, torch.float32, f"L={n_layers} m={m}")


def test_pipeline_equals_direct_unbiased_hsic_and_cka() -> None:
    xs = _layers(70, 24, 4, seed=1)
    want = hsic_matrix_direct(xs)
    got = hsic_pipeline(xs)
    assert_close(got, want, torch.float32, "HSIC vs direct")
    direct_cka = want / torch.sqrt(torch.diagonal(want)[:, None] * torch.diagonal(want)[None, :])
    assert_close(cka_from_hsic(got), direct_cka, torch.float32, "CKA vs direct")


def test_batches_of_different_m_accumulate_estimates() -> None:
    """Each batch's HSIC is normalised by 1/(m(m-3)) before summing: the accumulator equals the
    sum of the per-batch unbiased estimates, whatever the batches' token counts."""
    acc = None
    want = torch.zeros(3, 3, dtype=torch.float64)
    for i, (n, keep) in enumerate([(40, 0.5), (130, 0.9), (9, 1.0)]):
        xs = _layers(n, 16, 3, seed=i)
        mask = torch.rand(n, generator=torch.Generator().manual_seed(i)) < keep
        grams = torch.stack([ucentered_gram(x, mask) for x in xs])
        acc = hsic_accumulate(grams, acc)
        want += hsic_matrix_direct([x[mask] for x in xs])
    assert_close(acc, want, torch.float32, "accumulated vs sum of estimates")


def test_row_order_equals_all_pairs() -> None:
    grams = torch.stack([ucentered_gram(x) for x in _layers(33, 8, 5, seed=2)])
    full = hsic_accumulate(grams)
    for layer in range(1, 5):
        row = hsic_row_accumulate(grams[layer], grams[:layer])
        assert_close(row, full[layer, :layer].double(), torch.float32, f"row {layer}")


def test_cka_self_is_one_and_invariances() -> None:
    x, y = _layers(60, 20, 2, seed=3)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(4)))
    cka = cka_from_hsic(hsic_pipeline([x, y, x @ q, 3.7 * y, x]))
    assert cka.dtype == torch.float64
    one = torch.ones(5, dtype=torch.float64)
    assert_close(torch.diagonal(cka), one, torch.float32, "CKA(X, X) diagonal")
    assert_close(cka[0, [2, 4]], one[:2], torch.float32, "CKA(X, XQ) and CKA(X, X)")
    base = cka[0, 1].expand(3)
    assert_close(torch.stack([cka[2, 1], cka[0, 3], cka[2, 3]]), base, torch.float32, "orthogonal / scale")
    assert 0.1 < float(cka[0, 1]) < 0.999


def test_small_values_are_not_truncated() -> None:
    xs = [0.01 * x for x in _layers(20, 6, 2, seed=5)]  # HSIC ~ 1e-8: an integer cast would give 0
    got = hsic_pipeline(xs)
    want = hsic_matrix_direct(xs)
    assert float(want.abs().max()) < 1e-3
    assert_close(got, want, torch.float32, "tiny HSIC")


def test_too_few_tokens_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 4 valid tokens"):
        ucentered_gram(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 4 valid tokens"):
        ucentered_gram_ref(torch.randn(10, 5), torch.arange(10) < 3)
    with pytest.raises(ValueError, match=r"\[L, m, m\]"):
        hsic_accumulate(torch.randn(4, 5, 6))
    with pytest.raises(ValueError, match="gram must be"):
        hsic_row_accumulate(torch.randn(5, 5), torch.randn(2, 6, 6))


def test_cka_from_hsic_constant_layer_is_finite() -> None:
    h = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    cka = cka_from_hsic(h)
    assert torch.isfinite(cka).all() and cka[0, 0] == 1 and cka[0, 1] == 0
