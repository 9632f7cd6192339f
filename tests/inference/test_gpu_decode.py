"""The GPU decode path (fused Triton kernels replayed as CUDA graphs) against the fp32 forward, for every
layer kind the runtime has. Needs CUDA (``gpu`` marker); on CPU the same FusedDecode runs in the Triton
interpreter in tests/inference/test_runtime.py."""

from __future__ import annotations

import pytest
import torch

from layerfold.core.model import Model
from layerfold.core.spec import ModelSpec
from layerfold.inference.runtime import Runtime
from tests.support.models import RUNTIME_SPECS, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SPECS = RUNTIME_SPECS  # per-layer widths, heads and GQA groups, shortcut matrices, an MLP block, attention only
PROMPTS = {"batch1": [[1, 2, 3, 4, 5, 6, 7]], "ragged": [[1, 2, 3, 4, 5, 6, 7], [9, 8], list(range(11, 22))]}


def _model(spec: ModelSpec, seed: int = 0) -> Model:
    return tiny_model(spec, seed=seed, norm_gains=True).cuda()


def _teacher_forced(m: Model, rt: Runtime, prompts: list[list[int]], steps: int) -> None:
    """Feed the fp32 forward's greedy tokens to the runtime; every step's logits must match the forward's."""
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(steps):
            for s in seqs:
                s.append(int(m(torch.tensor([s], device="cuda"))[0, -1].argmax()))
        full = [m(torch.tensor([s], device="cuda"))[0].float() for s in seqs]  # (T, V) each
    logits = rt.prefill(prompts)
    for step in range(steps + 1):
        for i, p in enumerate(prompts):
            want = full[i][len(p) - 1 + step]
            err = (logits[i] - want).abs().max().item() / want.abs().max().item()
            tol = 2e-3 if rt.dtype == torch.float32 else 5e-2
            assert err < tol, f"row {i} step {step}: relative logit error {err:.2e} > {tol}"
            if rt.dtype == torch.float32:
                assert int(logits[i].argmax()) == int(want.argmax()) or err < 1e-4
        if step < steps:
            logits = rt.decode([s[len(p) + step] for p, s in zip(prompts, seqs, strict=True)])


@pytest.mark.parametrize("prompts", list(PROMPTS))
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_graph_decode_matches_fp32_forward(name: str, prompts: str) -> None:
    m = _model(SPECS[name])
    rt = Runtime(m, max_batch=4, max_len=64)
    assert rt.backend == "triton" and rt._graphs is not None and rt.net.fused is not None
    _teacher_forced(m, rt, PROMPTS[prompts], steps=6)
    assert rt._graphs.graphs, "decode did not run through a CUDA graph"
    assert rt.lengths[:len(PROMPTS[prompts])] == [len(p) + 6 for p in PROMPTS[prompts]]


def test_bf16_graph_decode_close_to_fp32_forward() -> None:
    m = _model(SPECS["hetero"], seed=3)
    rt = Runtime(m, max_batch=4, max_len=64, dtype=torch.bfloat16)
    _teacher_forced(m, rt, PROMPTS["ragged"], steps=4)


def test_buckets_pad_idle_rows_and_pick_gemv() -> None:
    """3 rows run in the 4-row graph: the idle row's length stays 0; a GEMV was picked per weight."""
    m = _model(SPECS["hetero"], seed=1)
    rt = Runtime(m, max_batch=4, max_len=64)
    _teacher_forced(m, rt, PROMPTS["ragged"], steps=3)
    assert rt._graphs.bucket(3) == 4 and 4 in rt._graphs.graphs and rt.lengths[3] == 0
    picks = rt.graph_picks[4]
    assert sum(v for k, v in picks.items() if not k.startswith("attn:")) == len(rt.net.fused.weights())
    # LAYERFOLD_DECODE_ATTN=auto (the default): a form per attention layer
    assert sum(v for k, v in picks.items() if k.startswith("attn:")) == sum(
        s.kind == "attn" for s in rt.net.fused.stages)
    # what each pick timed, in ms on the card: every distinct GEMV shape had cuBLAS and Triton timed
    timed = rt.graph_timings[4]
    shapes = {f"{w.shape[0]}x{w.shape[1]}" for w in rt.net.fused.weights()}
    assert {k.split(" ")[1] for k in timed if k.split(" ")[0] in ("gemv", "down")} == shapes
    for what, cands in timed.items():
        ran = [t for t in cands.values() if t is not None]
        assert ran and all(0 < t < 50 for t in ran), (what, cands)
        if what.startswith("gemv"):
            assert "cublas" in cands and any(c.startswith("triton_") for c in cands)


@pytest.mark.parametrize("rows", [1, 16])
def test_every_attention_form_passes_its_check_in_bf16(rows: int) -> None:
    """On the GPU, in bf16, every form of the attention kernel (each in one pass too where the default splits)
    agrees with the reference, so the auto pick chooses among all of them by speed alone."""
    from layerfold.kernels.attn_decode import planned_splits

    m = _model(SPECS["hetero"], seed=4)
    rt = Runtime(m, max_batch=16, max_len=512, dtype=torch.bfloat16)
    fused = rt.net.fused
    timed: list[int] = []
    s = next(s for s in fused.stages if s.kind == "attn")
    kv, g, hd, slots = s.akey
    fused._pick_attention(rows, s.layer, s.akey, lambda fn: timed.append(1) or 1.0)
    per_form = 2 if planned_splits(rows, kv, g, hd, slots, m.device) > 1 else 1
    assert len(timed) == 3 * per_form


def test_long_context_split_attention() -> None:
    """A cache long enough for split-K attention (several splits per row at batch 1)."""
    from layerfold.kernels.attn_decode import _attn_decode_block_s
    from layerfold.kernels.heuristics import attn_decode_splits

    m = _model(SPECS["hetero"], seed=2)
    rt = Runtime(m, max_batch=1, max_len=256)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert attn_decode_splits(1, 2, 256, sms, _attn_decode_block_s(16, 2)) > 1
    _teacher_forced(m, rt, [list(range(3, 150))], steps=3)


@pytest.mark.parametrize("kw", [{}, {"kernels": "triton", "cuda_graphs": False}, {"kernels": "torch"}],
                         ids=["triton-graphs", "triton-eager", "torch-eager"])
def test_scrubbed_row_decodes_as_fresh_on_cuda(kw: dict) -> None:
    """A failed sequence's NaN left in its row is zeroed by reset(scrub=True) on every CUDA path (in place, so
    the captured graphs see it): the next, shorter sequence in that row decodes as in a fresh Runtime."""
    m = _model(SPECS["hetero"], seed=4)
    prompts = [list(range(1, 30)), [5, 6, 7]]
    ref = Runtime(m, max_batch=2, max_len=64, **kw)
    ref.prefill(prompts)
    want = ref.decode([3, 4])
    rt = Runtime(m, max_batch=2, max_len=64, **kw)
    rt.prefill([list(range(1, 30)), list(range(2, 31))])
    rt.decode([3, 4])  # builds the graph before the poison
    for layer in rt.net.layers:
        if layer.k is not None:
            layer.k[1] = float("nan")
            layer.v[1] = float("nan")
    rt.reset([1], scrub=True)
    rt.prefill([prompts[1]], rows=[1])
    rt.lengths[0] = 29  # row 0 as in the reference: its prompt, before the decode above
    got = rt.decode([3, 4])
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompts", list(PROMPTS))
def test_programmatic_dependent_launch_decodes_the_same(prompts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERFOLD_PDL=1 (each decode kernel waits for the previous one's writes before it reads or writes):
    the CUDA-graph decode matches the fp32 forward and the plain launches' logits (to the rounding of the
    GEMV each runtime picked: a read before the previous kernel's write would be off by far more), for a
    model with every layer kind and a ragged batch; on a GPU before Hopper it launches plainly."""
    from layerfold.kernels._dispatch import pdl

    m = _model(SPECS["hetero"], seed=5)
    plain = Runtime(m, max_batch=4, max_len=64)
    want = [plain.prefill(PROMPTS[prompts])]
    for t in range(5):
        want.append(plain.decode([t + 3] * len(PROMPTS[prompts])))
    monkeypatch.setenv("LAYERFOLD_PDL", "1")
    on = bool(pdl(torch.zeros(1, device="cuda")))
    assert on == (torch.cuda.get_device_capability()[0] >= 9)
    rt = Runtime(m, max_batch=4, max_len=64)
    got = [rt.prefill(PROMPTS[prompts])]
    for t in range(5):
        got.append(rt.decode([t + 3] * len(PROMPTS[prompts])))
    assert rt._graphs.graphs
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rt.reset()
    _teacher_forced(m, rt, PROMPTS[prompts], steps=4)


@pytest.mark.parametrize("prompts", list(PROMPTS))
@pytest.mark.parametrize("name", list(SPECS))
def test_norm_fused_graph_decode_matches_fp32_forward(name: str, prompts: str, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """LAYERFOLD_NORM_GEMV=fused: every normalised input read by a Triton GEMV has its norm fused in (the
    residual in the previous GEMV's epilogue), through the CUDA graphs; the decode matches the fp32 forward
    for every layer kind, batch 1 and ragged."""
    monkeypatch.setenv("LAYERFOLD_NORM_GEMV", "fused")
    m = _model(SPECS[name], seed=6)
    rt = Runtime(m, max_batch=4, max_len=64)
    _teacher_forced(m, rt, PROMPTS[prompts], steps=5)
    fused = rt.net.fused
    readers = {id(w) for w in [fused.first_w, *fused.next_w] if w is not None}
    bucket = rt._graphs.bucket(len(PROMPTS[prompts]))
    assert {k[1] for k in fused.norm_choice if k[0] == bucket} == readers
    assert rt.graph_picks[bucket].get("fused-norm") == len(readers)
    norm_times = {k: v for k, v in rt.graph_timings[bucket].items() if k.startswith("norm ")}
    assert norm_times and all(0 < len(v) <= 2 for v in norm_times.values())  # the plain GEMV's two fastest configs
