"""Inference kernels (RMSNorm, rotary, SwiGLU, attention decode), Triton in the interpreter, against
their torch references in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from layerfold.kernels.attn_decode import attn_decode, attn_decode_ref, attn_decode_sdpa
from layerfold.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from layerfold.kernels.rotary import rotary, rotary_ref
from layerfold.kernels.swiglu import swiglu, swiglu_ref
from tests.support.inputs import DTYPES
from tests.support.tolerances import assert_close


def close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    """The output is in the input dtype (rounded once to it) and within TOL[dtype] of the fp64 reference."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert_close(got, want, dtype, what)


def rnd(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def rope_tables(n: int, hd: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (n,), generator=g).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 100), (3, 4, 130), (2, 576)])
def test_rmsnorm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = rnd(shape, dtype, seed=sum(shape), scale=3.0)
    w = (rnd((shape[-1],), torch.float32, seed=1) * 0.2 + 1).to(dtype)
    close(rmsnorm(x, w, 1e-5), rmsnorm_ref(x.double(), w.double(), 1e-5), dtype, f"rmsnorm {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,hd", [(1, 1, 8), (5, 3, 12), (2, 7, 64), (3, 20, 80)])
def test_rotary(n: int, h: int, hd: int, dtype: torch.dtype) -> None:
    x = rnd((n, h, hd), dtype, seed=n * h + hd)
    cos, sin = rope_tables(n, hd, dtype, seed=hd)
    close(rotary(x, cos, sin), rotary_ref(x.double(), cos.double(), sin.double()), dtype, f"rotary {n}x{h}x{hd}")


def test_rotary_strided_q_and_k_inside_fused_qkv() -> None:
    n, nh, nkv, hd = 4, 6, 2, 16
    qkv = rnd((n, (nh + 2 * nkv) * hd), torch.float32, seed=3)
    qk = qkv[:, :(nh + nkv) * hd].view(n, nh + nkv, hd)  # row stride (nh + 2 nkv) * hd
    assert not qk.is_contiguous()
    cos, sin = rope_tables(n, hd, torch.float32, seed=4)
    close(rotary(qk, cos, sin), rotary_ref(qk.double(), cos.double(), sin.double()), torch.float32, "strided")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,f", [(1, 1), (3, 37), (2, 1000), (1, 1536)])
def test_swiglu(n: int, f: int, dtype: torch.dtype) -> None:
    gu = rnd((n, 2 * f), dtype, seed=n + f, scale=4.0)
    close(swiglu(gu), swiglu_ref(gu.double()), dtype, f"swiglu {n}x{f}")


def test_swiglu_strided_rows_and_3d() -> None:
    big = rnd((2, 5, 90), torch.float32, seed=5)
    gu = big[..., 4:84]  # (2, 5, 80), row stride 90
    close(swiglu(gu), swiglu_ref(gu.double()), torch.float32, "strided 3-D")


def _attn_case(b: int, kv: int, g: int, hd: int, s: int, dtype: torch.dtype, seed: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = rnd((b, kv, g, hd), dtype, seed=seed, scale=2.0)
    k = rnd((b + 1, kv, s, hd), dtype, seed=seed + 1)  # one more cache row than sequences
    v = rnd((b + 1, kv, s, hd), dtype, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    lengths[0] = s  # a full row
    if b > 1:
        lengths[-1] = 1  # a row with only its new token
    return q, k, v, lengths


def _poison(k: Tensor, lengths: Tensor) -> Tensor:
    """NaN in every slot past a sequence's length (and in the spare row): reading one would show."""
    k = k.clone()
    k[len(lengths):] = float("nan")
    for i, n in enumerate(lengths.tolist()):
        k[i, :, n:] = float("nan")
    return k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,kv,g,hd,s", [(1, 1, 1, 16, 1), (3, 2, 3, 20, 50), (2, 3, 4, 64, 130), (4, 1, 7, 8, 33)])
def test_attn_decode(b: int, kv: int, g: int, hd: int, s: int, dtype: torch.dtype) -> None:
    q, k, v, lengths = _attn_case(b, kv, g, hd, s, dtype, seed=b * 100 + s)
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths)
    got = attn_decode(q, _poison(k, lengths), _poison(v, lengths), lengths.to(torch.int32))
    close(got, want, dtype, f"attn_decode b={b} kv={kv} g={g} hd={hd} s={s}")


@pytest.mark.parametrize("window", [1, 7, 100])
def test_attn_decode_sliding_window(window: int) -> None:
    q, k, v, lengths = _attn_case(3, 2, 2, 16, 40, torch.float32, seed=window)
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths, window=window)
    close(attn_decode(q, k, v, lengths, window=window), want, torch.float32, f"window {window}")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("b,kv,g,hd,s", [(1, 1, 1, 16, 1), (3, 2, 3, 20, 50), (4, 1, 7, 8, 33)])
def test_attn_decode_sdpa_equals_the_reference(b: int, kv: int, g: int, hd: int, s: int, window: int | None) -> None:
    """The whole-cache SDPA alternative (LAYERFOLD_DECODE_ATTN=sdpa): G query heads as G query positions of a KV
    head, the length (and window) mask built from ``lengths``; a spare cache row is not read."""
    q, k, v, lengths = _attn_case(b, kv, g, hd, s, torch.float32, seed=s + 3)
    k, v = torch.cat([k, torch.randn_like(k[:1]) * 1e3]), torch.cat([v, torch.randn_like(v[:1]) * 1e3])
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths, window=window)
    close(attn_decode_sdpa(q, k, v, lengths, window=window), want, torch.float32, f"sdpa b={b} s={s} w={window}")


def test_attn_decode_ref_is_plain_softmax_attention() -> None:
    """The reference itself against the textbook formula, one sequence at a time."""
    q, k, v, lengths = _attn_case(2, 2, 3, 8, 9, torch.float64, seed=7)
    out = attn_decode_ref(q, k, v, lengths)
    for i, n in enumerate(lengths.tolist()):
        s = q[i] @ k[i, :, :n].transpose(-1, -2) / math.sqrt(8)  # (kv, g, n)
        assert torch.allclose(out[i], torch.softmax(s, -1) @ v[i, :, :n], atol=1e-12)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = rnd((3, 10), torch.float32, seed=8)
    w = torch.ones(10)
    assert torch.equal(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))
    gu = rnd((2, 8), torch.float32, seed=9)
    assert torch.equal(swiglu(gu), swiglu_ref(gu))


def test_launchers_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="Fix:"):
        rmsnorm(torch.ones(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="Fix:"):
        rotary(torch.ones(2, 3, 8), torch.ones(2, 6), torch.ones(2, 6))
    with pytest.raises(ValueError, match="Fix:"):
        swiglu(torch.ones(2, 7))
    with pytest.raises(ValueError, match="Fix:"):
        attn_decode(torch.ones(1, 2, 1, 8), torch.ones(1, 3, 4, 8), torch.ones(1, 3, 4, 8), torch.tensor([1]))
