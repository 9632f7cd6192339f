"""One tolerance table, per dtype, and the comparisons that use it.

``TOL[dtype]`` is how far a result computed in ``dtype`` may be from a reference computed in higher
precision (or by another route in the same dtype): |actual - expected| <= rtol |expected| + atol
max|expected|. The atol term is relative to the largest reference magnitude because the errors of sums
and matrix products scale with it, not with the element (a cancelled element can be ~0).

Pick the entry of the dtype the result is *computed* in: the statistics kernels accumulate in fp32
whatever their input dtype, so their checks use the float32 entry; an inference kernel rounds its
output to the input dtype, so its checks use that dtype's entry. Exact checks stay exact
(``torch.equal``), and tolerances that state a mathematical property rather than a rounding error
(1e-12 on pure fp64 algebra, the slack of a Python float sum) stay where they are, and so do the bounds
of two bf16 routes through a whole model (tests/inference), whose roundings compound per layer on both
sides, beyond one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor


@dataclass(frozen=True)
class Tol:
    rtol: float  # relative to the reference element
    atol: float  # relative to the largest reference magnitude


TOL = {
    # ~1e4 ulps: the fp64 references and fp64 model paths, summed in another order
    torch.float64: Tol(rtol=1e-12, atol=1e-12),
    # fp32 sums over a few hundred terms (the kernels' accumulators; a model forward by another route):
    # ~170 ulps, while a tf32 matmul (10-bit mantissa, ~1e-3) is 50x over
    torch.float32: Tol(rtol=2e-5, atol=2e-5),
    # one rounding to fp16 (half an ulp: 2^-11 = 4.9e-4 relative) and a few fp32 ulps of math before it
    torch.float16: Tol(rtol=1e-3, atol=1e-3),
    # one rounding to bf16 (half an ulp: 2^-8 = 3.9e-3 relative) and a few fp32 ulps of math before it
    torch.bfloat16: Tol(rtol=8e-3, atol=8e-3),
}


def tol(dtype: torch.dtype | Tol) -> Tol:
    """The table's entry for ``dtype`` (a Tol is returned as it is)."""
    return dtype if isinstance(dtype, Tol) else TOL[dtype]


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | Tol, what: str = "", *,
                 equal_nan: bool = False, check_dtype: bool = False) -> None:
    """|actual - expected| <= rtol |expected| + atol max|expected| with ``TOL[dtype]`` (or a Tol), else fail
    naming the worst element (index, both values, error and allowed error). With ``equal_nan``, nan must
    be where the reference has nan, and only there; otherwise every value must be finite. With
    ``check_dtype``, both must have the same dtype (as torch.testing.assert_close and torch.allclose ask)."""
    t = tol(dtype)
    name = f"{what} ({dtype})" if what else str(dtype)
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if equal_nan:
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: nan pattern differs\n{a}\n{e}"
        a, e = a.nan_to_num(), e.nan_to_num()
    assert torch.isfinite(a).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs()
    allowed = t.rtol * e.abs() + t.atol * scale
    excess = err - allowed
    worst = int(torch.argmax(excess))
    if excess.reshape(-1)[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())}/{e.numel()} elements out of tolerance; "
            f"worst at {idx}: got {a[idx].item():.9g}, expected {e[idx].item():.9g}, "
            f"error {err[idx].item():.3g} > allowed {allowed[idx].item():.3g} (max |ref| {scale:.3g})"
        )


def approx(expected: float | list[float], dtype: torch.dtype | Tol) -> object:
    """``pytest.approx`` with the table's tolerance, for scalars (and lists of them) computed in ``dtype``."""
    t = tol(dtype)
    scale = max(abs(v) for v in expected) if isinstance(expected, list) else abs(expected)
    return pytest.approx(expected, rel=t.rtol, abs=t.atol * scale)
