"""Compiled kernels on a CUDA device against the fp64 references (skipped without CUDA).

Sizes are realistic (SmolLM2-135M widths); fp32 tolerances are tight enough that a tf32 tl.dot
(10-bit mantissa, ~1e-3 relative error) would fail them.
"""

from __future__ import annotations

import pytest
import torch

from layerfold import kernels
from tests.support.inputs import DTYPES, make_mask, make_x, zeros64
from tests.support.tolerances import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def _cuda(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d"), [(1, 7), (4099, 576), (777, 1000)])
def test_gpu_gram(n: int, d: int, dtype: torch.dtype) -> None:
    x, mask = make_x((n, d), dtype, seed=n), make_mask("random", n, seed=n)
    got = kernels.gram_accumulate(_cuda(x), _cuda(mask))
    want = kernels.gram_accumulate_ref(x.double(), mask, zeros64((d, d), (d,), (d,)))
    for g, w, name in zip(got, want, ("G", "s", "ss"), strict=True):
        assert_close(g, w, torch.float32, f"gpu {name} n={n} d={d}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d"), [(1, 7), (2051, 576), (300, 4096), (17, 8192)])
def test_gpu_unit_rows(n: int, d: int, dtype: torch.dtype) -> None:
    x = make_x((n, d), dtype, seed=n)
    ring = torch.zeros((2, n, d + 64), device=CUDA, dtype=torch.float16)  # a slot of a wider ring
    got = kernels.unit_rows(_cuda(x), out=ring[1, :, :d])
    torch.testing.assert_close(got.cpu(), kernels.unit_rows_ref(x.double(), torch.float16), atol=1e-3, rtol=0)
    assert ring[0].eq(0).all() and ring[1, :, d:].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "k"), [(33, 7, 1), (2051, 576, 8), (300, 1000, 13)])
def test_gpu_cosine(n: int, d: int, k: int, dtype: torch.dtype) -> None:
    base = make_x((n, d), dtype, seed=n)
    others = (base.float()[None] + make_x((k, n, d), torch.float32, seed=k, offset=0)).to(dtype)
    mask = make_mask("random", n, seed=n)
    got = kernels.cosine_window_sum(_cuda(base), _cuda(others), _cuda(mask))
    want = kernels.cosine_window_sum_ref(base.double(), others.double(), mask,
                                         torch.zeros(k, dtype=torch.float64))
    assert_close(got, want, torch.float32, f"gpu cosine n={n} d={d} k={k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "c"), [(5, 7), (4097, 1536)])
def test_gpu_channels(n: int, c: int, dtype: torch.dtype) -> None:
    g, u = make_x((n, c), dtype, seed=1, offset=-0.3), make_x((n, c), dtype, seed=2)
    mask = make_mask("random", n, seed=n)
    got = kernels.swiglu_channel_stats(_cuda(g), _cuda(u), _cuda(mask))
    want = kernels.swiglu_channel_stats_ref(g.double(), u.double(), mask, zeros64((c,), (c,)))
    for a, w, name in zip(got, want, ("abs_sum", "sq_sum"), strict=True):
        assert_close(a, w, torch.float32, f"gpu swiglu {name}")
    got = kernels.channel_stats(_cuda(g), _cuda(mask))
    want = kernels.channel_stats_ref(g.double(), mask, zeros64((c,), (c,)))
    for a, w, name in zip(got, want, ("abs_sum", "sq_sum"), strict=True):
        assert_close(a, w, torch.float32, f"gpu channels {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "d", "n_layers"), [(4, 7, 1), (515, 576, 31)])
def test_gpu_cka(m: int, d: int, n_layers: int, dtype: torch.dtype) -> None:
    xs = [make_x((m, d), dtype, seed=i) for i in range(n_layers)]
    grams = torch.stack([kernels.ucentered_gram(_cuda(x)) for x in xs])
    grams_ref = torch.stack([kernels.ucentered_gram_ref(x.double()) for x in xs])
    assert_close(grams, grams_ref, torch.float32, "gpu ucentered_gram")
    hsic = kernels.hsic_accumulate(grams)
    assert_close(hsic, kernels.hsic_accumulate_ref(grams_ref), torch.float32, "gpu hsic")
    row = kernels.hsic_row_accumulate(grams[-1], grams[:-1])
    assert_close(row, kernels.hsic_row_accumulate_ref(grams_ref[-1], grams_ref[:-1]), torch.float32, "gpu row")


@pytest.mark.parametrize(("kv_early", "dot"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize(("b", "g", "s", "splits"), [(64, 1, 256, 1), (1, 4, 4096, None), (16, 8, 300, 2)])
def test_gpu_attn_decode_variants(kv_early: bool, dot: bool, b: int, g: int, s: int, splits: int | None) -> None:
    """The decode attention's swept variants compiled, bf16, at 7B-like head sizes, against the fp64 reference."""
    from layerfold.kernels.attn_decode import attn_decode, attn_decode_ref

    gen = torch.Generator().manual_seed(b + g)
    kv, hd = 4, 128
    q = torch.randn(b, kv, g, hd, generator=gen).bfloat16()
    k, v = (torch.randn(b, kv, s, hd, generator=gen).bfloat16() for _ in range(2))
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths)
    got = attn_decode(q.to(CUDA), k.to(CUDA), v.to(CUDA), lengths.to(CUDA), splits=splits, kv_early=kv_early, dot=dot)
    assert_close(got.cpu(), want, torch.bfloat16, f"kv_early={kv_early} dot={dot} b={b} g={g} s={s}")


def test_cuda_time_ms_times_the_device_not_the_host() -> None:
    """The picks' timer (kernels.gemv.cuda_time_ms) measures device time as a CUDA graph replays it: a host
    stall inside the timed callable is not counted (an eager timing would give at least 2 ms a call), and
    the time of a bandwidth-bound op grows with the bytes it moves (its operands come from HBM, not L2)."""
    import time

    from layerfold.kernels.gemv import cuda_time_ms

    x = torch.zeros(1, device="cuda")

    def stalled() -> torch.Tensor:
        time.sleep(0.002)
        return x.add_(1)

    # the GPU suite may run these tests while another process compiles on the same GPU (gpu_suite.SHADOW), whose
    # kernels can land inside a timed replay: the best of three tries is judged (a timer that counts the host's
    # 2 ms, or one that reads from L2, fails all three)
    assert min(cuda_time_ms(stalled, 5) for _ in range(3)) < 0.5
    big = torch.ones(1 << 27, device="cuda")  # 512 MiB, far past any L2
    small = big[: 1 << 24]  # 64 MiB
    ratios = []
    for _ in range(3):
        t_big, t_small = cuda_time_ms(lambda: big.mul_(1.0), 5), cuda_time_ms(lambda: small.mul_(1.0), 5)
        ratios.append(t_big / t_small)
        if 4.0 < ratios[-1] < 12.0:
            break
    assert 4.0 < ratios[-1] < 12.0, ratios


@pytest.mark.parametrize("n", [1, 3, 8])
def test_gpu_norm_gemv_every_config(n: int) -> None:
    """The input norm fused into the GEMV (kernels.gemv.norm_gemv), compiled, bf16, at the 7B QKV shape, under
    every candidate config the pick times, against the fp64 reference; and the pick returns a callable that
    computes the same (whichever side it chose)."""
    from layerfold.kernels.gemv import _cublas, norm_gemv, pick_norm_linear
    from layerfold.kernels.heuristics import GEMV_CONFIGS

    gen = torch.Generator().manual_seed(n)
    h = (torch.randn(n, 4096, generator=gen) * 4).bfloat16()
    g = (torch.rand(4096, generator=gen) + 0.5).bfloat16()
    w = (torch.randn(12288, 4096, generator=gen) * 0.02).bfloat16()
    b, r = torch.randn(12288, generator=gen).bfloat16(), torch.randn(n, 12288, generator=gen).bfloat16()
    hd = h.double()
    want = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()) @ w.double().T + b.double()
    want = want + r.double()
    args = [t.to(CUDA) for t in (h, g)]
    for cfg in GEMV_CONFIGS:
        got = norm_gemv(*args, 1e-5, w.to(CUDA), b.to(CUDA), r.to(CUDA), config=cfg)
        assert_close(got.cpu(), want, torch.bfloat16, f"norm_gemv n={n} {cfg.name}")
    fn, name = pick_norm_linear(n, w.to(CUDA), 1e-5, separate=(_cublas, "cublas"))
    assert name == "rmsnorm+cublas" or name.startswith("fused_norm_triton_"), name
    assert_close(fn(*args, w.to(CUDA), b.to(CUDA), r.to(CUDA)).cpu(), want, torch.bfloat16, f"pick {name}")


@pytest.mark.parametrize("n", [1, 4, 8])
def test_gpu_split_k_gemv_under_graph_replays(n: int) -> None:
    """The split-K GEMV configs (the last program of a column block adds the others' sums after an acq_rel
    atomic) at the 7B down projection's shape, bf16, compiled: right against fp64, and right on every one of
    50 CUDA-graph replays with new inputs each time (a counter left non-zero, or sums read before they are
    visible, would break some of them)."""
    from layerfold.kernels.gemv import gemv, swiglu_gemv
    from layerfold.kernels.heuristics import GEMV_CONFIGS

    gen = torch.Generator().manual_seed(n)
    w = (torch.randn(4096, 11008, generator=gen) * 0.02).bfloat16().to(CUDA)
    r = torch.randn(n, 4096, generator=gen).bfloat16().to(CUDA)
    for cfg in [c for c in GEMV_CONFIGS if c.split_k > 1]:
        x = torch.randn(n, 11008, generator=gen).bfloat16().to(CUDA)
        want = (x.double() @ w.double().T + r.double()).cpu()
        assert_close(gemv(x, w, None, r, config=cfg).cpu(), want, torch.bfloat16, f"{cfg.name} n={n}")
        gu = torch.randn(n, 2 * 11008, generator=gen).bfloat16().to(CUDA)
        a = torch.nn.functional.silu(gu[:, :11008].double()) * gu[:, 11008:].double()
        assert_close(swiglu_gemv(gu, w, None, r, config=cfg).cpu(), (a @ w.double().T + r.double()).cpu(),
                     torch.bfloat16, f"{cfg.name} swiglu n={n}")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv(x, w, None, r, config=cfg)
        for i in range(50):
            x.copy_(torch.randn(n, 11008, generator=gen).bfloat16())
            graph.replay()
            want = x.double() @ w.double().T + r.double()
            err = ((y.double() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, f"{cfg.name} n={n} replay {i}: relative error {err:.2e}"
