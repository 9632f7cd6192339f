"""The fused decode step's kernels (GEMV, rope + cache write, residual add + norm, split-K attention) against
fp64 torch references, in the Triton interpreter on CPU (compiled on a GPU, where the gpu tests run them)."""

from __future__ import annotations

import pytest
import torch

from layerfold.kernels.attn_decode import attn_decode, attn_decode_ref
from layerfold.kernels.gemv import gemv, gemv_ref
from layerfold.kernels.heuristics import GEMV_CONFIGS
from layerfold.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref
from layerfold.kernels.rope_cache import rope_cache, rope_cache_ref
from tests.kernels.test_infer_kernels import _attn_case, _poison, close, rnd, rope_tables
from tests.support.inputs import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,o,k", [(1, 7, 5), (3, 70, 100), (8, 130, 257), (5, 33, 64)])
@pytest.mark.parametrize("bias,res", [(False, False), (True, True)])
def test_gemv(n: int, o: int, k: int, bias: bool, res: bool, dtype: torch.dtype) -> None:
    x, w = rnd((n, k), dtype, seed=n + k), rnd((o, k), dtype, seed=o, scale=0.1)
    b = rnd((o,), dtype, seed=3) if bias else None
    r = rnd((n, o), dtype, seed=4) if res else None
    want = gemv_ref(x.double(), w.double(), None if b is None else b.double(), None if r is None else r.double())
    close(gemv(x, w, b, r), want, dtype, f"gemv {n}x{k} @ {o}x{k}")


def test_gemv_configs_and_strided_rows() -> None:
    x = rnd((4, 300), torch.float32, seed=1)[:, 10:210]  # row stride 300
    w = rnd((50, 200), torch.float32, seed=2)
    want = gemv_ref(x.double(), w.double())
    for cfg in GEMV_CONFIGS:  # the interpreter runs its own tiling; the configs must still be accepted
        close(gemv(x, w, config=cfg), want, torch.float32, cfg.name)
    with pytest.raises(ValueError, match="F.linear"):
        gemv(rnd((9, 200), torch.float32, seed=3), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [2, 3, 4, 8])
@pytest.mark.parametrize("n,o,k", [(1, 70, 257), (5, 33, 64), (8, 40, 5)])  # K spanning splits, one split, < a tile
def test_split_k_gemv(n: int, o: int, k: int, split: int, dtype: torch.dtype) -> None:
    """Split-K: each program sums its slice of K, the last of a column block's programs to arrive adds them all
    and applies the bias, residual and SwiGLU as the one-pass GEMV does; the counters are left at zero, so the
    next launch (a CUDA graph replays the same ones) starts clean, and repeated launches agree."""
    from layerfold.kernels import gemv as G
    from layerfold.kernels.gemv import swiglu_gemv, swiglu_gemv_ref
    from layerfold.kernels.heuristics import GemvConfig

    cfg = GemvConfig(block_o=16, block_k=64, warps=4, split_k=split)
    x, w = rnd((n, k), dtype, seed=n + k + split), rnd((o, k), dtype, seed=o, scale=0.1)
    b, r = rnd((o,), dtype, seed=3), rnd((n, o), dtype, seed=4)
    want = gemv_ref(x.double(), w.double(), b.double(), r.double())
    first = gemv(x, w, b, r, config=cfg)
    close(first, want, dtype, f"split {split}: gemv {n}x{k} @ {o}x{k}")
    assert int(G._COUNTERS[x.device].abs().sum()) == 0, "a counter was left non-zero"
    assert torch.equal(gemv(x, w, b, r, config=cfg), first)
    gu = rnd((n, 2 * k), dtype, seed=9)
    close(swiglu_gemv(gu, w, b, r, config=cfg), swiglu_gemv_ref(gu.double(), w.double(), b.double(), r.double()),
          dtype, f"split {split}: swiglu_gemv")


def test_split_k_refuses_the_fused_norm() -> None:
    from layerfold.kernels.gemv import norm_gemv
    from layerfold.kernels.heuristics import GemvConfig

    with pytest.raises(ValueError, match="splits K, but the fused norm needs each program to see the whole row"):
        norm_gemv(rnd((2, 64), torch.float32, seed=1), torch.ones(64), 1e-5, rnd((16, 64), torch.float32, seed=2),
                  config=GemvConfig(block_o=16, block_k=64, warps=4, split_k=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("n,nh,nkv,hd", [(1, 4, 4, 16), (3, 6, 2, 10), (2, 3, 1, 64)])
def test_rope_cache(n: int, nh: int, nkv: int, hd: int, norm: bool, dtype: torch.dtype) -> None:
    S = 40
    qkv = rnd((n, (nh + 2 * nkv) * hd), dtype, seed=nh * hd)
    cos, sin = rope_tables(S, hd, dtype, seed=5)
    pos = torch.randint(0, S, (n,), generator=torch.Generator().manual_seed(n))
    qn = (torch.rand(hd, generator=torch.Generator().manual_seed(6)) + 0.5).to(dtype) if norm else None
    kn = (torch.rand(hd, generator=torch.Generator().manual_seed(7)) + 0.5).to(dtype) if norm else None
    kc, vc = torch.full((n + 1, nkv, S, hd), float("nan"), dtype=dtype), torch.zeros((n + 1, nkv, S, hd), dtype=dtype)
    kw, vw = kc.double().clone(), vc.double().clone()
    q = rope_cache(qkv, cos, sin, pos, kc, vc, n_heads=nh, n_kv=nkv, q_norm=qn, k_norm=kn)
    want = rope_cache_ref(qkv.double(), cos.double(), sin.double(), pos, kw, vw, n_heads=nh, n_kv=nkv,
                          q_norm=None if qn is None else qn.double(), k_norm=None if kn is None else kn.double())
    close(q, want, dtype, "q")
    rows = torch.arange(n)
    close(kc[rows, :, pos], kw[rows, :, pos], dtype, "K written at each row's slot")
    close(vc[rows, :, pos], vw[rows, :, pos], dtype, "V written at each row's slot")
    untouched = torch.ones(n + 1, S, dtype=torch.bool)
    untouched[rows, pos] = False
    assert kc.isnan().permute(0, 2, 1, 3)[untouched].all(), "a slot other than the rows' own was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 7), (4, 130), (2, 576)])
def test_add_rmsnorm(n: int, d: int, dtype: torch.dtype) -> None:
    h, y = rnd((n, d), dtype, seed=d), rnd((n, d), dtype, seed=d + 1)
    w = (torch.rand(d, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)
    h64 = h.double()
    want = add_rmsnorm_ref(h64, y.double(), w.double(), 1e-6)
    x = add_rmsnorm(h, y, w, 1e-6)
    close(x, want, dtype, "normalised sum")
    close(h, h64, dtype, "residual updated in place")


@pytest.mark.parametrize("splits,block_s,stages", [(1, 16, None), (2, 16, None), (3, 32, None), (5, 16, None),
                                                   (64, 16, None), (1, 32, 3), (2, 16, 2)])
@pytest.mark.parametrize("window", [None, 9])
def test_attn_decode_split_k(splits: int, block_s: int, stages: int | None, window: int | None) -> None:
    """Every split count, tiling and pipelining depth gives the one-pass result: splits past a row's length
    write empty parts."""
    q, k, v, lengths = _attn_case(4, 2, 3, 16, 70, torch.float32, seed=splits)
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths, window=window)
    got = attn_decode(q, _poison(k, lengths), _poison(v, lengths), lengths, window=window, splits=splits,
                      block_s=block_s, stages=stages)
    close(got, want, torch.float32, f"splits={splits} block_s={block_s} stages={stages} window={window}")


# the dot variant in fp32 and fp16 only: the Triton interpreter's bf16 tl.dot returns garbage (a 16 x 16 bf16
# dot off by 1e10 under Triton 3.9's interpreter, fp16 exact); the gpu test below runs it compiled in bf16
@pytest.mark.parametrize("kv_early,dot,dtype", [(True, False, torch.float32), (True, False, torch.bfloat16),
                                                (False, True, torch.float32), (False, True, torch.float16)])
@pytest.mark.parametrize("splits,window", [(1, None), (3, 9)])
def test_attn_decode_variants(kv_early: bool, dot: bool, dtype: torch.dtype, splits: int, window: int | None) -> None:
    """The swept variants (values loaded with the keys; both products as tensor-core dots with the queries
    padded to 16 rows) give the reference's attention, GQA groups and poisoned unused slots included."""
    q, k, v, lengths = _attn_case(4, 2, 3, 16, 70, dtype, seed=7 + splits)
    want = attn_decode_ref(q.double(), k.double(), v.double(), lengths, window=window)
    got = attn_decode(q, _poison(k, lengths), _poison(v, lengths), lengths, window=window, splits=splits,
                      block_s=16, kv_early=kv_early, dot=dot)
    close(got, want, dtype, f"kv_early={kv_early} dot={dot} splits={splits} window={window}")
