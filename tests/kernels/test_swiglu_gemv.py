"""The MLP down projection with its SwiGLU activation fused into the GEMV's load (kernels/gemv.py,
``swiglu_gemv``) against torch references, in the Triton interpreter on CPU (tests/kernels/conftest.py
sets TRITON_INTERPRET=1 before triton is imported where there is no GPU; on a GPU machine its fixture
skips these, as it does the other interpreter tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.kernels import _dispatch
from layerfold.kernels.gemv import (
    _cublas,
    _gemv_kernel,
    pick_swiglu_linear,
    swiglu_gemv,
    swiglu_gemv_ref,
)
from layerfold.kernels.heuristics import GEMV_CONFIGS, GEMV_MAX_ROWS
from layerfold.kernels.swiglu import swiglu
from tests.kernels.test_infer_kernels import close, rnd
from tests.support.inputs import DTYPES
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(n: int, k: int, o: int, dtype: torch.dtype, bias: bool, res: bool, seed: int
          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    gu = rnd((n, 2 * k), dtype, seed=seed)
    w = rnd((o, k), dtype, seed=seed + 1, scale=0.1)
    b = rnd((o,), dtype, seed=seed + 2) if bias else None
    r = rnd((n, o), dtype, seed=seed + 3) if res else None
    return gu, w, b, r


def _want(gu: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, dt: torch.dtype) -> Tensor:
    """The fused result computed in ``dt`` from the same inputs, the activation not rounded (as the kernel)."""
    k = w.shape[1]
    g, u = gu[:, :k].to(dt), gu[:, k:].to(dt)
    y = F.linear(F.silu(g) * u, w.to(dt), None if b is None else b.to(dt))
    return y if r is None else y + r.to(dt)


def test_kernels_run_in_the_interpreter() -> None:
    assert _dispatch.interpreted(_gemv_kernel), "TRITON_INTERPRET=1 was not set before triton was imported"
    assert _dispatch.use_triton(torch.zeros(1)), "the CPU tensors must take the Triton path in these tests"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("k,o", [(200, 70), (64, 33), (5, 7)])  # K and O off the interpreter's 64 x 32 tiles
@pytest.mark.parametrize("bias,res", [(False, False), (True, False), (False, True), (True, True)])
def test_swiglu_gemv(n: int, k: int, o: int, bias: bool, res: bool, dtype: torch.dtype) -> None:
    gu, w, b, r = _case(n, k, o, dtype, bias, res, seed=n * 1000 + k + o)
    # fp32 / fp16 against fp64; bf16 against fp32 from the same bf16 inputs (the kernel's own math)
    want = _want(gu, w, b, r, torch.float32 if dtype == torch.bfloat16 else torch.float64)
    close(swiglu_gemv(gu, w, b, r), want, dtype, f"swiglu_gemv n={n} k={k} o={o} bias={bias} res={res}")


def test_activation_not_rounded_before_the_product() -> None:
    """One rounding: the fused result is the exact value rounded to fp16 (up to fp32 sums landing near a
    rounding boundary), while rounding silu(g) u to fp16 before the product (the separate path, as the
    reference computes it) moves about half of the outputs by an ulp. fp16, because the interpreter
    converts fp32 to bf16 by truncation (rounding_mode None in triton/runtime/interpreter.py's
    cast_impl) where the GPU rounds to nearest even."""
    gu, w, _, _ = _case(4, 256, 96, torch.float16, False, False, seed=11)
    exact = _want(gu, w, None, None, torch.float64).to(torch.float16)
    fused = (swiglu_gemv(gu, w) == exact).double().mean().item()
    separate = (swiglu_gemv_ref(gu, w) == exact).double().mean().item()
    assert fused >= 0.97, f"only {fused:.1%} of the outputs are the exact value rounded once"
    assert separate <= 0.8, f"the separate path matched {separate:.1%}: the test no longer tells the two apart"


def test_strided_rows_and_configs() -> None:
    base = rnd((3, 500), torch.float32, seed=5)
    gu = base[:, 50:450]  # (3, 400), row stride 500
    w = rnd((40, 200), torch.float32, seed=6, scale=0.1)
    want = _want(gu, w, None, None, torch.float64)
    for cfg in GEMV_CONFIGS:  # the interpreter runs its own tiling; the configs must still be accepted
        close(swiglu_gemv(gu, w, config=cfg), want, torch.float32, cfg.name)
    close(swiglu_gemv(gu.t().contiguous().t(), w), want, torch.float32, "column-major gu")


def test_zero_rows_and_zero_width() -> None:
    gu, w, b, _ = _case(0, 30, 9, torch.float32, True, False, seed=7)
    y = swiglu_gemv(gu, w, b, torch.zeros(0, 9))
    assert y.shape == (0, 9) and y.dtype == torch.float32
    gu, w, b, r = _case(2, 0, 9, torch.float32, True, True, seed=8)  # K = 0: y = bias + res
    close(swiglu_gemv(gu, w, b, r), (b.double() + r.double()), torch.float32, "K = 0")


def test_errors() -> None:
    w = rnd((16, 10), torch.float32, seed=9)
    with pytest.raises(ValueError, match="last dim 21 is odd"):
        swiglu_gemv(rnd((2, 21), torch.float32, seed=1), w)
    with pytest.raises(ValueError, match=r"w \(16, 10\) is 10 wide.*holds 12 activations"):
        swiglu_gemv(rnd((2, 24), torch.float32, seed=1), w)
    with pytest.raises(ValueError, match=f"9 rows, at most {GEMV_MAX_ROWS}.*F.linear"):
        swiglu_gemv(rnd((9, 20), torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="must be 2-D"):
        swiglu_gemv(rnd((1, 2, 20), torch.float32, seed=1), w)
    with pytest.raises(ValueError, match=r"res has shape \(2, 15\), expected \(2, 16\)"):
        swiglu_gemv(rnd((2, 20), torch.float32, seed=1), w, res=torch.zeros(2, 15))
    with pytest.raises(ValueError, match=r"bias has shape \(15,\), expected \(16,\)"):
        swiglu_gemv(rnd((2, 20), torch.float32, seed=1), w, bias=torch.zeros(15))


def test_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter (a plain CPU run) swiglu_gemv is the torch reference, bit for bit."""
    gu, w, b, r = _case(3, 50, 20, torch.bfloat16, True, True, seed=12)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _dispatch.use_triton(gu)
    y = swiglu_gemv(gu, w, b, r)
    assert torch.equal(y, swiglu_gemv_ref(gu, w, b, r))
    assert torch.equal(y, r + F.linear(F.silu(gu[:, :50]) * gu[:, 50:], w, b))
    with pytest.raises(ValueError, match="is odd"):  # the shape checks hold on the reference path too
        swiglu_gemv(gu[:, :99], w)


@pytest.mark.parametrize("n", [1, 6, 9])
def test_pick_swiglu_linear_off_cuda(n: int) -> None:
    gu, w, b, r = _case(n, 40, 24, torch.float32, True, True, seed=13)
    fn, name = pick_swiglu_linear(n, w, reps=2)
    assert name == "swiglu+cublas"
    got = fn(gu, w, b, r)
    assert torch.equal(got, _cublas(swiglu(gu), w, b, r)), "not the separate path"
    close(got, _want(gu, w, b, r, torch.float64), torch.float32, f"pick_swiglu_linear n={n}")
    assert_close(fn(gu, w, None, None), _want(gu, w, None, None, torch.float64), torch.float32, "no bias, no res")
