"""A layer's input RMSNorm fused into the GEMV that reads it (kernels/gemv.py, ``norm_gemv``) against torch
references, in the Triton interpreter on CPU (tests/kernels/conftest.py sets TRITON_INTERPRET=1 before triton
is imported where there is no GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.kernels import _dispatch
from layerfold.kernels.gemv import _cublas, norm_gemv, norm_gemv_ref, pick_norm_linear
from layerfold.kernels.heuristics import GEMV_CONFIGS, GEMV_MAX_ROWS
from tests.kernels.test_infer_kernels import close, rnd
from tests.support.inputs import DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1e-5


def _case(n: int, k: int, o: int, dtype: torch.dtype, bias: bool, res: bool, seed: int
          ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    h = rnd((n, k), dtype, seed=seed, scale=3.0)  # not unit rms: the scale must come out of the norm
    g = (rnd((k,), torch.float32, seed=seed + 4).abs() + 0.5).to(dtype)
    w = rnd((o, k), dtype, seed=seed + 1, scale=0.1)
    b = rnd((o,), dtype, seed=seed + 2) if bias else None
    r = rnd((n, o), dtype, seed=seed + 3) if res else None
    return h, g, w, b, r


def _want(h: Tensor, g: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, dt: torch.dtype) -> Tensor:
    """The fused result computed in ``dt`` from the same inputs, the normalised row not rounded (as the kernel)."""
    hf = h.to(dt)
    x = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS) * g.to(dt)
    y = F.linear(x, w.to(dt), None if b is None else b.to(dt))
    return y if r is None else y + r.to(dt)


def test_kernel_runs_in_the_interpreter() -> None:
    assert _dispatch.use_triton(torch.zeros(1)), "the CPU tensors must take the Triton path in these tests"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("k,o", [(200, 70), (64, 33), (5, 7)])  # K and O off the interpreter's 64 x 32 tiles
@pytest.mark.parametrize("bias,res", [(False, False), (True, True)])
def test_norm_gemv(n: int, k: int, o: int, bias: bool, res: bool, dtype: torch.dtype) -> None:
    h, g, w, b, r = _case(n, k, o, dtype, bias, res, seed=n * 1000 + k + o)
    want = _want(h, g, w, b, r, torch.float32 if dtype == torch.bfloat16 else torch.float64)
    close(norm_gemv(h, g, EPS, w, b, r), want, dtype, f"norm_gemv n={n} k={k} o={o} bias={bias} res={res}")
    # and it is the separate path up to that path's one extra rounding (of the normalised row)
    close(norm_gemv(h, g, EPS, w, b, r), norm_gemv_ref(h, g, EPS, w, b, r).to(torch.float64), dtype, "vs separate")


def test_rows_are_normalised_each_by_its_own_rms() -> None:
    """Rows of very different scales: each row's result is that of its normalised row alone (a sum of squares
    mixed across rows, or one row's rms applied to another, fails this)."""
    h, g, w, _, _ = _case(4, 96, 40, torch.float32, False, False, seed=3)
    h = h * torch.tensor([[1e-3], [1.0], [50.0], [1e3]])
    y = norm_gemv(h, g, EPS, w)
    for i in range(4):
        close(y[i:i + 1], _want(h[i:i + 1], g, w, None, None, torch.float64), torch.float32, f"row {i}")
    # where eps is negligible against the mean square (not row 0), the result does not depend on the row's scale
    close(norm_gemv(h[1:] * 7.0, g, EPS, w), y[1:].double(), torch.float32, "invariant to the row's scale")


def test_strided_rows_and_configs() -> None:
    base = rnd((3, 500), torch.float32, seed=5)
    h = base[:, 50:250]  # (3, 200), row stride 500
    g = rnd((200,), torch.float32, seed=7).abs() + 0.5
    w = rnd((40, 200), torch.float32, seed=6, scale=0.1)
    want = _want(h, g, w, None, None, torch.float64)
    for cfg in GEMV_CONFIGS:  # split-K configs are refused (test_decode_kernels), the others computed
        if cfg.split_k == 1:
            close(norm_gemv(h, g, EPS, w, config=cfg), want, torch.float32, cfg.name)


def test_zero_rows() -> None:
    h, g, w, b, _ = _case(0, 30, 9, torch.float32, True, False, seed=7)
    y = norm_gemv(h, g, EPS, w, b, torch.zeros(0, 9))
    assert y.shape == (0, 9) and y.dtype == torch.float32


def test_errors() -> None:
    h, g, w = rnd((2, 10), torch.float32, seed=1), torch.ones(10), rnd((16, 10), torch.float32, seed=9)
    with pytest.raises(ValueError, match="disagree on the width"):
        norm_gemv(h, torch.ones(11), EPS, w)
    with pytest.raises(ValueError, match="disagree on the width"):
        norm_gemv(rnd((2, 12), torch.float32, seed=1), torch.ones(12), EPS, w)
    with pytest.raises(ValueError, match="disagree on the width"):
        norm_gemv(torch.zeros(2, 0), torch.ones(0), EPS, torch.zeros(16, 0))
    with pytest.raises(ValueError, match=f"9 rows, at most {GEMV_MAX_ROWS}"):
        norm_gemv(rnd((9, 10), torch.float32, seed=1), g, EPS, w)
    with pytest.raises(ValueError, match="must be"):
        norm_gemv(h[None], g, EPS, w)
    with pytest.raises(ValueError, match=r"res has shape \(2, 15\), expected \(2, 16\)"):
        norm_gemv(h, g, EPS, w, res=torch.zeros(2, 15))


def test_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter (a plain CPU run) norm_gemv is the torch reference, bit for bit."""
    h, g, w, b, r = _case(3, 50, 20, torch.bfloat16, True, True, seed=12)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _dispatch.use_triton(h)
    y = norm_gemv(h, g, EPS, w, b, r)
    assert torch.equal(y, norm_gemv_ref(h, g, EPS, w, b, r))
    assert torch.equal(y, r + F.linear(F.rms_norm(h, (50,), g, EPS), w, b))


def test_pick_off_cuda_is_the_separate_path_untimed() -> None:
    """Off CUDA nothing is timed: the separate path (norm, then the given product) is returned, and it computes
    the same as the reference."""
    h, g, w, b, r = _case(2, 40, 24, torch.float32, True, True, seed=13)
    fn, name = pick_norm_linear(2, w, EPS, separate=(_cublas, "cublas"))
    assert name == "rmsnorm+cublas"
    close(fn(h, g, w, b, r), _want(h, g, w, b, r, torch.float64), torch.float32, "separate")
