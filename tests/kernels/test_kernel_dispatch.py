"""Dispatch rule, interpreter activation and input validation shared by every launcher."""

from __future__ import annotations

import pytest
import torch

from layerfold import kernels
from layerfold.kernels import _dispatch, channels, cka, cosine, gram
from tests.support.inputs import make_x
from tests.support.tolerances import assert_close

# (module, launcher, the torch function plain CPU runs (the reference, or a faster CPU path beside it),
#  kernel, call with small valid inputs)
CASES = [
    (gram, "gram_accumulate", "gram_accumulate_ref", gram._gram_kernel,
     lambda f: f(make_x((9, 5), torch.float32, 0))),
    (cosine, "cosine_window_sum", "cosine_window_sum_ref", cosine._cosine_window_kernel,
     lambda f: f(make_x((9, 5), torch.float32, 0), make_x((2, 9, 5), torch.float32, 1))),
    (channels, "channel_stats", "_stats_cpu", channels._channel_stats_kernel,
     lambda f: f(make_x((9, 5), torch.float32, 0))),
    (channels, "swiglu_channel_stats", "_stats_cpu", channels._channel_stats_kernel,
     lambda f: f(make_x((9, 5), torch.float32, 0), make_x((9, 5), torch.float32, 1))),
    (cka, "ucentered_gram", "ucentered_gram_ref", cka._ucentered_gram_kernel,
     lambda f: f(make_x((9, 5), torch.float32, 0))),
    (cka, "hsic_accumulate", "hsic_accumulate_ref", cka._hsic_kernel,
     lambda f: f(torch.randn(2, 6, 6))),
    (cka, "hsic_row_accumulate", "hsic_row_accumulate_ref", cka._hsic_row_kernel,
     lambda f: f(torch.randn(6, 6), torch.randn(2, 6, 6))),
]
IDS = [c[1] for c in CASES]


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the torch reference ran instead of the Triton kernel")


@pytest.mark.parametrize(("module", "launcher", "ref", "kernel", "call"), CASES, ids=IDS)
def test_interpreter_runs_the_triton_kernel(module, launcher, ref, kernel, call, monkeypatch) -> None:
    assert _dispatch.use_triton(torch.zeros(1))
    assert type(_dispatch.launchable(kernel)).__name__ == "InterpretedFunction"
    monkeypatch.setattr(module, ref, _refuse)
    call(getattr(module, launcher))


@pytest.mark.parametrize(("module", "launcher", "ref", "kernel", "call"), CASES, ids=IDS)
def test_plain_cpu_runs_the_torch_path(module, launcher, ref, kernel, call, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _dispatch.use_triton(torch.zeros(1))
    ran = []
    real = getattr(module, ref)
    monkeypatch.setattr(module, ref, lambda *a, **k: ran.append(1) or real(*a, **k))
    call(getattr(module, launcher))
    assert ran == [1]


def test_late_interpreter_request_names_the_fix() -> None:
    compiled = object()  # stands in for a kernel decorated before TRITON_INTERPRET was set
    with pytest.raises(RuntimeError, match="before anything imports triton"):
        _dispatch.launchable(compiled)


def test_mode_follows_the_environment_at_call_time(monkeypatch) -> None:
    x = make_x((20, 6), torch.float32, 0)
    interp = kernels.gram_accumulate(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    ref = kernels.gram_accumulate(x)
    for a, b, name in zip(interp, ref, ("G", "s", "ss"), strict=True):
        assert_close(a, b, torch.float32, f"interpreted vs torch {name}", check_dtype=True)


def test_accumulator_checks() -> None:
    x = make_x((8, 4), torch.float32, 0)
    with pytest.raises(TypeError, match="float32"):
        kernels.channel_stats(x, acc=(torch.zeros(4, dtype=torch.float64), torch.zeros(4)))
    with pytest.raises(ValueError, match="shape"):
        kernels.channel_stats(x, acc=(torch.zeros(5), torch.zeros(5)))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.cosine_window_sum(x, torch.stack([x, x]), acc=torch.zeros(4)[::2])


def test_input_checks() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        kernels.gram_accumulate(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[N, d\] or \[B, T, d\]"):
        kernels.gram_accumulate(torch.zeros(3))
    with pytest.raises(ValueError, match="mask must have the token shape"):
        kernels.gram_accumulate(torch.zeros(4, 3), torch.ones(5, dtype=torch.bool))


def test_empty_inputs_leave_acc_unchanged() -> None:
    g, s, ss = kernels.gram_accumulate(torch.zeros(0, 5))
    assert g.shape == (5, 5) and not g.any() and not s.any() and not ss.any()
    assert kernels.cosine_window_sum(torch.zeros(3, 4), torch.zeros(0, 3, 4)).shape == (0,)


def test_fp64_reference_path_keeps_fp64(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(10, 4, dtype=torch.float64)
    assert kernels.gram_accumulate(x)[0].dtype == torch.float64
    assert kernels.ucentered_gram(x).dtype == torch.float64
    assert kernels.channel_stats(x.float())[0].dtype == torch.float32


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_cpu_paths_match_references(masked, dtype, monkeypatch) -> None:
    """The faster torch paths plain CPU runs (channel stats, unit-vector window cosines, batched CKA) equal
    the references, padding (even nan in it) ignored."""
    monkeypatch.delenv("TRITON_INTERPRET")
    B, T, d = 3, 11, 20
    x, g, u = (make_x((B, T, d), dtype, s) for s in (0, 1, 2))
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :3] = mask[2, 8:] = False
        x[0, 0] = g[0, 0] = float("nan")
    for got, want in ((channels.channel_stats(x, mask), channels.channel_stats_ref(x, mask)),
                      (channels.swiglu_channel_stats(g, u, mask), channels.swiglu_channel_stats_ref(g, u, mask))):
        assert_close(got[0], want[0], dtype, "abs_sum", check_dtype=True)
        assert_close(got[1], want[1], dtype, "sq_sum", check_dtype=True)
    others = torch.stack([make_x((B, T, d), torch.float32, s) for s in (3, 4)])
    if masked:
        others[:, 0, 0] = float("nan")
    base = x.float().nan_to_num()
    unit = base / base.norm(dim=-1, keepdim=True)
    want = cosine.cosine_window_sum_ref(base, others, mask)
    assert_close(cosine.cosine_window_sum(base, others, mask, base_unit=unit), want, torch.float32, "unit base",
                 check_dtype=True)
    o_unit = others / others.norm(dim=-1, keepdim=True)
    got = cosine.cosine_window_sum(base, o_unit.half(), mask, base_unit=unit.half(), others_unit=True)
    assert_close(got, cosine.cosine_window_sum_ref(base, others, mask), torch.float16, "fp16 unit vectors",
                 check_dtype=True)
    xs = make_x((4, 9, d), torch.float64, 5)
    k = cka.ucentered_grams(xs)
    assert_close(k, torch.stack([cka.ucentered_gram_ref(v) for v in xs]), torch.float64, "ucentered_grams",
                 check_dtype=True)
    prev = torch.stack([torch.stack([cka.ucentered_gram_ref(make_x((9, d), torch.float64, 10 + 3 * i + j))
                                     for j in range(3)]) for i in range(4)])
    want_row = sum(cka.hsic_row_accumulate_ref(k[i], prev[i]) for i in range(4))
    assert_close(cka.hsic_rows(k, prev), want_row.double(), torch.float64, "hsic_rows", check_dtype=True)


def test_batched_cka_triton_path_matches_cpu_path(monkeypatch) -> None:
    xs = make_x((3, 10, 12), torch.float32, 7)
    prev = torch.stack([torch.stack([cka.ucentered_gram_ref(make_x((10, 12), torch.float32, 20 + 2 * i + j))
                                     for j in range(2)]) for i in range(3)])
    k_tri = cka.ucentered_grams(xs)
    row_tri = cka.hsic_rows(k_tri, prev)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert_close(k_tri, cka.ucentered_grams(xs), torch.float32, "ucentered_grams", check_dtype=True)
    assert_close(row_tri, cka.hsic_rows(k_tri, prev), torch.float32, "hsic_rows", check_dtype=True)


def test_programmatic_dependent_launch_is_opt_in_and_cuda_only(monkeypatch) -> None:
    """LAYERFOLD_PDL=1 asks for it; off CUDA (this machine, the interpreter) no kernel gets the launch
    option, so the interpreted decode kernels run exactly as without it (their PDL branch is compiled out)."""
    from layerfold.kernels import rmsnorm

    x = make_x((3, 40), torch.float32, 0)
    w = make_x((40,), torch.float32, 1)
    monkeypatch.delenv("LAYERFOLD_PDL", raising=False)
    assert _dispatch.pdl(x) == {}
    want = rmsnorm.rmsnorm(x, w, 1e-6)
    monkeypatch.setenv("LAYERFOLD_PDL", "1")
    assert _dispatch.pdl(x) == {}  # a CPU tensor
    assert torch.equal(rmsnorm.rmsnorm(x, w, 1e-6), want)
    import inspect

    from layerfold.kernels import attn_decode, gemv, rope_cache, swiglu

    for k in (rmsnorm._rmsnorm_kernel, rmsnorm._add_rmsnorm_kernel, swiglu._swiglu_kernel, gemv._gemv_kernel,
              rope_cache._rope_cache_kernel, attn_decode._attn_decode_kernel, attn_decode._attn_split_kernel,
              attn_decode._attn_combine_kernel):  # every kernel of the decode step takes the flag, off by default
        assert inspect.signature(k.fn).parameters["PDL"].default is False, k
