"""The native batch-1 CPU decode step (layerfold.inference.native, kernels/cpu_decode.cpp) against the torch step."""

from __future__ import annotations

import pytest
import torch

from layerfold.inference.native import _library, native_unavailable, pack
from layerfold.inference.runtime import Runtime
from tests.support.models import RUNTIME_SPECS, tiny_model

pytestmark = pytest.mark.skipif(_library()[0] is None, reason=f"native step unavailable: {_library()[1]}")

PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # longer than the sliding window (5) of one spec


def test_pack_layout_round_trips() -> None:
    w = torch.randn(100, 37).to(torch.bfloat16)  # rows not a multiple of 48, odd K
    p = pack(w)
    assert p.shape == (3, 37, 48) and p.dtype == torch.bfloat16
    assert torch.equal(p.transpose(1, 2).reshape(-1, 37)[:100], w)
    assert not p.transpose(1, 2).reshape(-1, 37)[100:].any()  # zero rows pad the last block


def _teacher_forced(rt: Runtime, steps: list[int]) -> list[torch.Tensor]:
    rt.reset()
    out = [rt.prefill([PROMPT])[0]]
    for t in steps:
        out.append(rt.decode([t])[0])
    return out


@pytest.mark.parametrize("name", list(RUNTIME_SPECS))
def test_native_step_matches_torch_step(name: str) -> None:
    """Every layer kind (GQA, per-layer head sizes incl. 10 and 8, a replacement MLP block, shortcut
    matrices, an attention-only layer, qk-norm + qkv bias, a sliding window): teacher-forced decode
    steps of the native and torch runtimes in bf16, both against the fp32 forward. The native step
    must be as close to fp32 as the torch bf16 step, and leave the same KV cache behind."""
    m32 = tiny_model(RUNTIME_SPECS[name], seed=3, norm_gains=True)
    m = tiny_model(RUNTIME_SPECS[name], seed=3, norm_gains=True, dtype=torch.bfloat16)
    steps = [21, 5, 17, 40, 2, 33, 8, 12]
    nat = Runtime(m, max_batch=1, max_len=48, native=True)
    ref = Runtime(m, max_batch=1, max_len=48, native=False)
    assert nat.native is not None and ref.native is None
    got, want = _teacher_forced(nat, steps), _teacher_forced(ref, steps)
    with torch.no_grad():
        exact = m32(torch.tensor([PROMPT + steps]))[0, len(PROMPT) - 1:]  # (1 + steps, V)
    rel = lambda a, i: (a[i] - exact[i]).abs().max().item() / exact[i].abs().max().item()
    err_native = [rel(got, i) for i in range(1, len(got))]  # the decode steps (0 is the shared prefill)
    err_torch = [rel(want, i) for i in range(1, len(got))]  # ~0.01 on these models
    assert all(a < 1.5 * b + 0.004 for a, b in zip(err_native, err_torch, strict=True)), (err_native, err_torch)
    assert sum(err_native) < 1.2 * sum(err_torch), (err_native, err_torch)
    L = len(PROMPT) + len(steps)
    # native vs torch bf16 (here and below): two bf16 routes through the whole model, whose roundings compound
    # per layer on both sides, so the bounds are the test's own rather than TOL[bfloat16] (one rounding)
    for a, b in zip(nat.net.layers, ref.net.layers, strict=True):
        if a.k is not None:
            for x, y in ((a.k, b.k), (a.v, b.v)):
                x, y = x[0, :, :L].float(), y[0, :, :L].float()
                assert (x - y).abs().max().item() <= 0.02 * y.abs().max().item() + 1e-3
    assert nat.lengths == ref.lengths == [L]


def test_threads_split_rows_not_sums() -> None:
    """Each output row is one thread's dot product, so 1 and 2 threads give the same bits."""
    m = tiny_model(RUNTIME_SPECS["hetero"], seed=4, norm_gains=True, dtype=torch.bfloat16)
    rt = Runtime(m, max_batch=1, max_len=48, native=True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _teacher_forced(rt, [7, 8, 9])
        torch.set_num_threads(2)
        two = _teacher_forced(rt, [7, 8, 9])
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_rows_of_different_lengths_match_the_torch_step() -> None:
    """Up to 4 rows decode in one native step (each weight read once for all): rows of different
    lengths, an inactive row and a 3-row step after a 4-row one, against the torch step's logits."""
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], seed=7, norm_gains=True, dtype=torch.bfloat16)
    prompts = [PROMPT, [20, 21], [30, 31, 32, 33, 34, 35], [40, 41, 42]]

    def run(native: bool) -> list[torch.Tensor]:
        rt = Runtime(m, max_batch=4, max_len=48, native=native)
        assert (rt.native is not None) == native and (not native or rt.native.max_rows == 4)
        rt.prefill(prompts)
        out = [rt.decode([5, 6, 7, 8]), rt.decode([9, 10, 11, 12], active=[True, False, True, True]),
               rt.decode([13, 14, 15])]
        assert rt.lengths == [len(p) + n for p, n in zip(prompts, (3, 2, 3, 2), strict=True)]
        return out

    for a, b in zip(run(True), run(False), strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


def test_batches_after_native_steps_read_its_cache() -> None:
    """Rows decoded natively, then batched with more rows than the native step takes (the torch path):
    the same logits as a runtime that never used the native step."""
    m = tiny_model(RUNTIME_SPECS["qk_norm+bias"], seed=5, norm_gains=True, dtype=torch.bfloat16)

    def run(native: bool) -> torch.Tensor:
        rt = Runtime(m, max_batch=5, max_len=48, native=native)
        rt.prefill([PROMPT, [60, 61]])
        for t in (30, 31, 32):
            rt.decode([t, t + 1])  # two rows: native when on
        rt.prefill([[50, 51, 52], [53], [54, 55]], rows=[2, 3, 4])
        return rt.decode([33, 34, 56, 57, 58])  # five rows: the torch step reads rows 0 and 1 of the cache

    assert (run(True) - run(False)).abs().max().item() < 0.05 * run(False).abs().max().item()


def test_refusals_name_cause_and_fix() -> None:
    m = tiny_model(RUNTIME_SPECS["hetero"], norm_gains=True)
    assert "bf16" in native_unavailable(Runtime(m, max_batch=1, max_len=16, native=False).net, torch.device("cpu"),
                                        torch.float32)
    with pytest.raises(ValueError, match="bf16.*Fix:"):
        Runtime(m, max_batch=1, max_len=16, native=True)  # fp32 model
    rt = Runtime(m.to(torch.bfloat16), max_batch=1, max_len=16, native=True)
    with pytest.raises(ValueError, match="out of range.*Fix:"):
        rt.native([10**6], [0])
    with pytest.raises(ValueError, match="rows.*Fix:"):
        rt.native([1, 2], [0, 0])  # a one-row runtime


@pytest.mark.slow
def test_compiled_bf16_runtime_runs_few_rows_natively() -> None:
    """A compiled bf16 runtime compiles graphs only for more rows than the native step takes: up to 4
    rows decode natively, and the compiled graph then reads the cache rows the native step wrote
    (logits within bf16 noise of the eager torch runtime's)."""
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], seed=6, norm_gains=True, dtype=torch.bfloat16)
    comp = Runtime(m, max_batch=5, max_len=48, compile=True, autotune=False)
    ref = Runtime(m, max_batch=5, max_len=48, native=False)
    assert comp.native is not None and comp.native.max_rows == 4 and comp.compile_s > 0
    for rt in (comp, ref):
        rt.reset()
        rt.prefill([PROMPT, [20, 21, 22]])
    for t in (30, 31, 32, 33):  # two rows: native vs eager torch
        a, b = comp.decode([t, t + 10]), ref.decode([t, t + 10])
        assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
    for rt in (comp, ref):
        rt.prefill([[40, 41], [42, 43, 44], [45]], rows=[2, 3, 4])
    a, b = comp.decode([34, 44, 46, 47, 48]), ref.decode([34, 44, 46, 47, 48])  # five rows: the compiled graph
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
