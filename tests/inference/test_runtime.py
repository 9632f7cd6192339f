"""Runtime (fused weights, static KV cache, per-row lengths) against the Model forward, in fp32."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerfold.core.model import Model
from layerfold.inference.decode_net import attend_reduce
from layerfold.inference.runtime import Runtime, decode_weight_bytes
from tests.support.models import RUNTIME_SPECS, hetero_runtime_spec, tiny_model, tiny_spec
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_with_runtime(rt: Runtime, prompts: list[list[int]], steps: int,
                        rows: list[int] | None = None) -> tuple[list[list[int]], torch.Tensor]:
    logits = rt.prefill(prompts, rows)
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        if rows is None:
            logits = rt.decode(nxt)
        else:  # feed every row 0..max(rows); the others are inactive
            toks = [0] * (max(rows) + 1)
            for r, t in zip(rows, nxt, strict=True):
                toks[r] = t
            full = rt.decode(toks, active=[r in rows for r in range(len(toks))])
            logits = full[rows]
    return seqs, logits


def check_against_forward(m: Model, prompts: list[list[int]], seqs: list[list[int]], last: torch.Tensor) -> None:
    with torch.no_grad():
        for i, s in enumerate(seqs):
            full = m(torch.tensor([s], device=m.device))[0]  # (T, V), on the model's device
            want = full[len(prompts[i]) - 1:-1].argmax(-1).tolist()
            assert s[len(prompts[i]):] == want, f"prompt {i}: runtime {s[len(prompts[i]):]} vs forward {want}"
            # fp32 logits: fused GEMMs and SDPA vs the eager forward
            assert_close(last[i], full[-1], torch.float32, f"prompt {i}: last-step logits vs forward")


@pytest.mark.parametrize("name,kernels", [(n, "torch") for n in RUNTIME_SPECS] + [
    ("qk_norm+bias", "triton"), ("sliding+llama3rope", "triton"), ("yarn", "triton")])  # Triton: interpreted
def test_runtime_matches_forward(name: str, kernels: str) -> None:
    m = tiny_model(RUNTIME_SPECS[name], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, kernels=kernels)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=6 if kernels == "torch" else 3)  # interpreter: slow
    check_against_forward(m, prompts, seqs, last)
    assert rt.lengths == [len(s) for s in seqs]


def test_sdpa_attention_switch_matches_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERFOLD_DECODE_ATTN=sdpa (the whole-cache SDPA the GPU suite measures against the kernel) decodes as the
    forward does, GQA and a sliding window included (the fused Triton step, interpreted)."""
    monkeypatch.setenv("LAYERFOLD_DECODE_ATTN", "sdpa")
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, kernels="triton")
    assert rt.backend == "triton" and rt.net.fused.attn.__name__ == "attn_decode_sdpa"
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=3)
    check_against_forward(m, prompts, seqs, last)


@pytest.mark.parametrize("attn", ["early", "dot"])
def test_prepared_attention_forms_match_forward(monkeypatch: pytest.MonkeyPatch, attn: str) -> None:
    """The kernel's two prepared loop forms (LAYERFOLD_DECODE_ATTN=early|dot, which the GPU suite measures end
    to end) decode as the forward does through the fused Triton step (interpreted; fp32, where the
    interpreter's dots are exact)."""
    monkeypatch.setenv("LAYERFOLD_DECODE_ATTN", attn)
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, kernels="triton")
    assert rt.net.fused.attn.keywords == ({"kv_early": True} if attn == "early" else {"dot": True})
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=3)
    check_against_forward(m, prompts, seqs, last)


@pytest.mark.parametrize("name", ["hetero", "qk_norm+bias"])
def test_norm_fused_into_the_gemvs_matches_forward(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """LAYERFOLD_NORM_GEMV=fused: every stage input's RMSNorm (and the final norm) rides in the GEMV that reads
    it, the residual in the previous GEMV's epilogue; decoding matches the forward with every layer kind
    (shortcut matrices fused and alone, an MLP block, attention only, qkv bias, q/k norm), interpreted."""
    monkeypatch.setenv("LAYERFOLD_NORM_GEMV", "fused")
    from layerfold.inference import fused_step

    calls: list[int] = []
    real = fused_step.norm_gemv
    monkeypatch.setattr(fused_step, "norm_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = tiny_model(RUNTIME_SPECS[name], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, kernels="triton")
    fused = rt.net.fused
    readers = {id(w) for w in [fused.first_w, *fused.next_w] if w is not None}
    assert fused.norm_mode == "fused" and fused.net.head is fused.next_w[-1] and len(readers) >= 4
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=3)
    assert len(calls) == 3 * len(readers), "not every normalised input went through the fused GEMV"
    check_against_forward(m, prompts, seqs, last)


def test_norm_pick_tries_the_configs_fastest_for_the_plain_gemv() -> None:
    """The fused norm shares the plain GEMV's loads, so its pick compiles and times only the two configs that
    were fastest for that weight's plain GEMV (cuBLAS and failed configs are no config); all of them where
    nothing was timed."""
    from layerfold.inference.fused_step import _fastest_configs
    from layerfold.kernels.heuristics import GEMV_CONFIGS as C

    times = {"cublas": 0.001, C[3].name: 0.02, C[1].name: 0.03, C[0].name: None, C[2].name: 0.05}
    assert _fastest_configs(times, 2) == [C[3], C[1]]
    unsplit = [c for c in C if c.split_k == 1]  # the fused norm needs whole rows: no split-K config
    assert len(unsplit) < len(C) and _fastest_configs({"cublas": 0.01}, 2) == unsplit == _fastest_configs({}, 2)
    assert _fastest_configs({c.name: 0.001 for c in C if c.split_k > 1} | {C[2].name: 0.1}, 2) == [C[2]]


def test_norm_switch_is_checked_and_off_keeps_the_norms_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFOLD_NORM_GEMV", "always")
    with pytest.raises(ValueError, match="'always' is unknown. Fix: use one of auto, fused, off"):
        Runtime(tiny_model(RUNTIME_SPECS["hetero"]), max_batch=1, max_len=16, kernels="triton")
    for mode in ("off", "auto"):  # off CUDA, auto fuses nothing: nothing was timed
        monkeypatch.setenv("LAYERFOLD_NORM_GEMV", mode)
        fused = Runtime(tiny_model(RUNTIME_SPECS["hetero"]), max_batch=2, max_len=16, kernels="triton").net.fused
        picks = fused.tune(2)
        assert "fused-norm" not in picks and fused.norm_choice == {}
        assert all(fused._norm_fn(1, w) is None for w in fused.next_w)


def test_unknown_attention_switch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFOLD_DECODE_ATTN", "flash")
    with pytest.raises(ValueError, match="'flash' is unknown. Fix: use one of auto, kernel, sdpa"):
        Runtime(tiny_model(RUNTIME_SPECS["sliding+llama3rope"]), max_batch=1, max_len=16, kernels="triton")


def test_auto_attention_picks_the_fastest_correct_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERFOLD_DECODE_ATTN=auto (the default): each form is checked against the reference, a form that
    disagrees is never timed nor picked however fast, the fastest of the others serves every attention layer
    of that shape at that many rows, and decoding through it matches the forward (interpreted, fp32)."""
    from layerfold.inference import fused_step

    monkeypatch.delenv("LAYERFOLD_DECODE_ATTN", raising=False)
    monkeypatch.setitem(fused_step.ATTN_FORMS, "wrong", {"scale": 0.5})  # a wrong result, "timed" fastest
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, kernels="triton")
    fused = rt.net.fused
    assert fused.attn_mode == "auto" and rt.graph_picks == {}  # no CUDA graphs on a CPU
    timed: list[str] = []
    speed = {"kernel": 3.0, "early": 2.0, "dot": 1.0, "wrong": 0.1}

    def timer(call) -> float:  # call: the timed closure; its default argument is the form's partial
        form = next(k for k, kw in fused_step.ATTN_FORMS.items() if kw == call.__defaults__[0].keywords)
        timed.append(form)
        return speed[form]

    picked = fused.tune_attention(3, timer=timer)
    n_attn = sum(s.kind == "attn" for s in fused.stages)
    shapes = {s.akey for s in fused.stages if s.kind == "attn"}
    assert "wrong" not in timed, "the wrong form was timed: the check against the reference let it through"
    assert sorted(timed) == sorted(["kernel", "early", "dot"] * len(shapes))  # no split variants interpreted
    assert picked == {"attn:dot": n_attn}
    # every candidate's time is kept per shape (ms); the wrong form, never timed, is None
    assert fused.timings[3] == {"attn " + ",".join(map(str, k)): {
        "attn:kernel": 3000.0, "attn:early": 2000.0, "attn:dot": 1000.0, "attn:wrong": None} for k in shapes}
    assert all(f.keywords == {"dot": True} for (rows, _), f in fused.attn_choice.items() if rows == 3)

    def not_tuned(*a, **k):
        raise AssertionError("a 3-row step used the untuned attention")

    fused.attn = not_tuned  # every 3-row step must go through the pick
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=3)
    check_against_forward(m, prompts, seqs, last)


def test_fixed_attention_switch_is_not_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A named LAYERFOLD_DECODE_ATTN is kept: tune() times no attention form."""
    monkeypatch.setenv("LAYERFOLD_DECODE_ATTN", "kernel")
    rt = Runtime(tiny_model(RUNTIME_SPECS["sliding+llama3rope"]), max_batch=2, max_len=16, kernels="triton")
    fused = rt.net.fused
    picks = fused.tune(2)
    assert not any(k.startswith("attn:") for k in picks) and fused.attn_choice == {}
    # off CUDA every down projection keeps its activation apart (swiglu, then torch's product), untimed
    downs = sum(s.kind == "mlp" and not s.layer.fused_mlp_sc for s in fused.stages)
    assert downs and picks.get("swiglu+cublas") == downs == len(fused.down_choice)
    assert sum(picks.values()) == len(fused.weights())


def test_rows_are_independent() -> None:
    """Batched (different lengths, scattered rows, idle rows in between) equals one row at a time."""
    m = tiny_model(hetero_runtime_spec(), seed=1, norm_gains=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    rt = Runtime(m, max_batch=6, max_len=32)
    batched, last_b = greedy_with_runtime(rt, prompts, steps=5, rows=[4, 0, 2])
    for i, p in enumerate(prompts):
        single, last_s = greedy_with_runtime(Runtime(m, max_batch=1, max_len=32), [p], steps=5)
        assert single[0] == batched[i]
        assert_close(last_b[i], last_s[0], torch.float32, f"row {i}: batched vs alone")
    check_against_forward(m, prompts, batched, last_b)


def test_bf16_runtime_close_to_forward() -> None:
    m = tiny_model(hetero_runtime_spec(), seed=2, norm_gains=True, dtype=torch.bfloat16)
    rt = Runtime(m, max_batch=1, max_len=32)
    logits = rt.prefill([[3, 4, 5, 6]])
    logits = rt.decode([7])
    with torch.no_grad():
        want = m(torch.tensor([[3, 4, 5, 6, 7]]))[0, -1].float()
    # two bf16 routes through five layers: roundings compound on both sides, beyond TOL[bfloat16] (one rounding)
    assert (logits[0] - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_limits_raise_with_fix() -> None:
    m = tiny_model(hetero_runtime_spec(), norm_gains=True)
    rt = Runtime(m, max_batch=2, max_len=8)
    with pytest.raises(ValueError, match="Fix:"):
        rt.prefill([list(range(1, 9))])  # 8 tokens leave no slot to generate into
    with pytest.raises(ValueError, match="Fix:"):
        rt.prefill([[1], [2]], rows=[0, 0])
    rt.prefill([list(range(1, 8))])
    rt.decode([1])
    with pytest.raises(ValueError, match="full"):
        rt.decode([1])
    with pytest.raises(ValueError, match="Fix:"):
        rt.decode([1, 2, 3])
    with pytest.raises(ValueError, match="Fix:"):
        Runtime(m, kernels="cuda-magic")


def test_weight_bytes_is_what_a_step_reads() -> None:
    tied = hetero_runtime_spec(tie_embeddings=False)
    m = tiny_model(tied, norm_gains=True)
    n = m.num_params() - tied.vocab_size * tied.d_model  # the embedding table is read a row at a time
    assert decode_weight_bytes(tied, torch.float32) == 4 * n
    dense = tiny_spec(d_model=32, n_layers=3, heads=4, kv_heads=2, ffn=64, vocab=100, tie=True)  # head_dim 8
    assert decode_weight_bytes(dense, torch.bfloat16) == 2 * tiny_model(dense).num_params()
    assert Runtime(tiny_model(dense), max_batch=2, max_len=16).cache_bytes() == 3 * 2 * 2 * 2 * 16 * 8 * 4


def test_bench_models_api_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark end to end on tiny checkpoints: the API the demo calls, and the CLI's JSON and PNG."""
    from layerfold import save_checkpoint
    from layerfold.cli.main import main
    from layerfold.evaluation.benchmark import bench_models

    dense = tiny_spec(d_model=32, n_layers=4, heads=4, kv_heads=2, ffn=64, vocab=200, tie=True, max_position=64,
                      bos_token_id=1)
    m = tiny_model(dense, norm_gains=True)
    srcs = []
    for name, keep in (("dense", 4), ("pruned", 3)):
        spec = dense.with_layers(dense.layers[:keep])
        state = {k: v for k, v in m.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < keep}
        save_checkpoint(tmp_path / name, spec, state)
        srcs.append(str(tmp_path / name))
    res = bench_models(srcs, baseline="hf", batch_sizes=(1, 2), new_tokens=3, prompt_len=4, repeats=3,
                       dtype=torch.float32, compile=False)  # compiling is covered by the slow test
    rows = {(r["model"], r["engine"], r["batch"]): r for r in res["rows"]}
    assert len(rows) == 8 and res["bandwidth"]["bandwidth_gbs"] > 0
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 and r["pct_of_bound"] > 0
        assert len(r["decode_runs"]) == 3 and r["decode_tok_s"] == statistics.median(r["decode_runs"])
    for b in (1, 2):  # ratios are paired by round, not ratios of medians
        d, p, h = (rows[(s, e, b)] for s, e in ((srcs[0], "layerfold"), (srcs[1], "layerfold"), (srcs[1], "hf")))
        paired = lambda a, b: statistics.median(x / y for x, y in zip(a["decode_runs"], b["decode_runs"], strict=True))
        assert p["speedup"] == pytest.approx(paired(p, d)) and p["vs_hf"] == pytest.approx(paired(p, h))
        lo, hi = p["pct_of_bound_range"]
        assert lo <= p["pct_of_bound"] <= hi and p["speedup_range"][0] <= p["speedup"] <= p["speedup_range"][1]
    from layerfold.evaluation.benchmark import step_bytes  # predicted: bytes read per decode step (weights + KV)

    ctx = 4 + 3 / 2
    pruned = dense.with_layers(dense.layers[:3])
    want = step_bytes(dense, torch.float32, 1, ctx) / step_bytes(pruned, torch.float32, 1, ctx)
    assert rows[(srcs[1], "layerfold", 1)]["predicted_speedup"] == pytest.approx(want)
    assert 1 < want < m.num_params() / tiny_model(dense.with_layers(dense.layers[:3])).num_params() + 0.1
    assert "vs_hf" in rows[(srcs[0], "layerfold", 2)]
    seq = bench_models(srcs, engines=["layerfold", "torch-eager"], batch_sizes=(1, 2), new_tokens=3, prompt_len=4,
                       repeats=2, dtype=torch.float32, compile=False, schedule="sequential")  # the GPU schedule
    got = {(r["model"], r["engine"], r["batch"]) for r in seq["rows"]}
    assert got == {(s, e, b) for s in srcs for e in ("layerfold", "torch-eager") for b in (1, 2)}
    assert all(len(r["decode_runs"]) == 2 and "vs_torch_eager" in r for r in seq["rows"] if r["engine"] == "layerfold")
    png = tmp_path / "bench.png"
    assert main(["bench", srcs[1], "--batch-sizes", "1", "--new-tokens", "2", "--prompt-len", "3", "--repeats", "1",
                 "--dtype", "fp32", "--no-compile", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["engine"] == "layerfold" and png.stat().st_size > 1000
    assert main(["bench", srcs[1], "--batch-sizes", "0"]) == 2
    assert main(["bench", srcs[1], "--no-compile", "--static-batches", "4"]) == 2  # static graphs need compile
    assert main(["serve", srcs[1], "--static-batches", "x"]) == 2  # both refused before anything loads
    assert main(["serve", srcs[1], "--static-batches", "4"]) == 2
    assert main(["serve", srcs[1], "--threads", "0"]) == 2
    assert "--static-batches" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_graph_triton_path_matches_forward() -> None:
    m = tiny_model(RUNTIME_SPECS["qk_norm+bias"], norm_gains=True).cuda()
    rt = Runtime(m, max_batch=3, max_len=48)
    assert rt.backend == "triton" and rt._graphs is not None
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    seqs, last = greedy_with_runtime(rt, prompts, steps=6)
    check_against_forward(m, prompts, seqs, last.cuda())


def test_idle_rows_pad_a_static_batch() -> None:
    """decode of n rows padded to a larger static batch (idle rows n..b-1, as a compiled runtime with
    static_batches does) returns the same tokens and logits, and leaves the idle rows' lengths alone."""
    m = tiny_model(hetero_runtime_spec(), seed=4, norm_gains=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [40, 41, 42, 43]]
    plain = Runtime(m, max_batch=4, max_len=32)
    padded = Runtime(m, max_batch=4, max_len=32)
    padded.static_batches = [4]  # what compile=True, static_batches=(4,) sets (the graphs aside)
    assert padded._graph_batch(3) == 4 and padded._graph_batch(1) == 1
    want, last_w = greedy_with_runtime(plain, prompts, steps=5)
    got, last_g = greedy_with_runtime(padded, prompts, steps=5)
    assert got == want and last_g.shape == last_w.shape
    assert_close(last_g, last_w, torch.float32, "padded static batch vs plain")
    assert padded.lengths == plain.lengths and padded.lengths[3] == 0
    with pytest.raises(ValueError, match="static_batches"):
        Runtime(m, max_batch=4, max_len=32, static_batches=(2,))  # not compiled
    with pytest.raises(ValueError, match="static_batches"):
        Runtime(m, max_batch=4, max_len=32, compile=True, static_batches=(8,))  # above max_batch


@pytest.mark.parametrize("window", [None, 3])
def test_attend_reduce_equals_sdpa(window: int | None) -> None:
    """The compiled CPU path's decode attention (products and sums) against SDPA, grouped heads and a
    per-row mask (rows at different lengths, optionally a sliding window)."""
    torch.manual_seed(0)
    n, kv, g, hd, L = 3, 2, 3, 16, 9
    q, k, v = torch.randn(n, kv, g, hd), torch.randn(n, kv, L, hd), torch.randn(n, kv, L, hd)
    pos = torch.tensor([8, 2, 5])
    j = torch.arange(L)[None, :]
    valid = j <= pos[:, None]
    if window is not None:
        valid = valid & (j > pos[:, None] - window)
    mask = valid[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(attend_reduce(q, k, v, mask), want, torch.float32, "masked", check_dtype=True)
    assert_close(attend_reduce(q[:1], k[:1], v[:1], None), F.scaled_dot_product_attention(q[:1], k[:1], v[:1]),
                 torch.float32, "no mask", check_dtype=True)


@pytest.mark.slow
def test_two_compiled_runtimes_share_a_process() -> None:
    """Two compiled runtimes in one process (dense and pruned in one bench, say) each run their own
    graphs: after warm-up dynamo checks only the guards that tell its graphs apart, so this checks that
    those include which runtime, batch of one or more, and for a sliding-window model the masked graph."""
    ms = [tiny_model(RUNTIME_SPECS["sliding+llama3rope"], norm_gains=True),
          tiny_model(RUNTIME_SPECS["qk_norm+bias"], seed=3, norm_gains=True)]
    rts = [Runtime(m, max_batch=3, max_len=48, compile=True, autotune=False) for m in ms]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    for _ in range(2):
        for m, rt in zip(ms, rts, strict=True):
            for batch in (prompts, prompts[:1], prompts[1:2]):
                seqs, last = greedy_with_runtime(rt, batch, steps=8)
                check_against_forward(m, batch, seqs, last)


@pytest.mark.slow
def test_compiled_static_batch_matches_forward() -> None:
    """A static batch graph (batch 3 here) serves 3 rows, and 2 rows padded with an idle one."""
    m = tiny_model(RUNTIME_SPECS["hetero"], seed=5, norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, compile=True, autotune=False, static_batches=(3,))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    for batch in (prompts, prompts[:2]):
        seqs, last = greedy_with_runtime(rt, batch, steps=8)
        check_against_forward(m, batch, seqs, last)


@pytest.mark.slow
def test_compiled_runtime_matches_forward() -> None:
    """torch.compile + inductor freezing (1-2 minutes of compiling): the caches must stay mutable inputs."""
    m = tiny_model(RUNTIME_SPECS["sliding+llama3rope"], norm_gains=True)
    rt = Runtime(m, max_batch=3, max_len=48, compile=True)
    assert rt.compile_s > 0
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    for batch in (prompts, prompts[:1]):  # the batch-of-one graph and the batched one
        seqs, last = greedy_with_runtime(rt, batch, steps=8)
        check_against_forward(m, batch, seqs, last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the native CPU step, where built
def test_copy_rows_gives_the_prefilled_cache_to_other_rows(dtype: torch.dtype) -> None:
    """A prompt prefilled once and copied (the server's n choices) decodes as if each row had prefilled it."""
    m = tiny_model(hetero_runtime_spec(), seed=2, norm_gains=True)
    p = [5, 6, 7, 8, 9, 10]
    rt = Runtime(m, max_batch=4, max_len=32, dtype=dtype)
    rt.prefill([[40, 41, 42, 43, 44, 45, 46, 47]], rows=[1])  # stale slots past the copy's length stay unread
    first = rt.prefill([p], rows=[0])
    rt.copy_rows(0, [1, 3])
    assert rt.lengths[:4] == [6, 6, 0, 6]
    ref = Runtime(m, max_batch=1, max_len=32, dtype=dtype)
    ref.prefill([p])
    toks = [int(first[0].argmax())] * 4
    for _ in range(3):
        got = rt.decode(toks, active=[True, True, False, True])
        want = ref.decode(toks[:1])
        for r in (0, 1, 3):
            assert_close(got[r], want[0], dtype, f"row {r}")
        toks = [int(want[0].argmax())] * 4
    with pytest.raises(ValueError, match="Fix"):
        rt.copy_rows(2, [0])  # row 2 holds nothing


@pytest.mark.parametrize("kind", ["eager", "triton"])
def test_scrubbed_row_gives_a_failed_sequences_nan_to_nobody(kind: str) -> None:
    """A sequence that failed may leave NaN in its row's cache; the torch path attends over the batch's longest
    row with a mask (a masked weight of 0 times NaN is NaN), so reset(scrub=True) zeroes the row, and the
    next, shorter sequence in it decodes as in a fresh Runtime. (The Triton step reads valid slots only.)"""
    model = tiny_model().eval()
    kw = {"kernels": "torch", "native": False} if kind == "eager" else {"kernels": "triton"}
    prompts = [list(range(1, 30)), [5, 6, 7]]
    ref = Runtime(model, max_batch=2, max_len=64, **kw)
    ref.prefill(prompts)
    want = ref.decode([3, 4])
    rt = Runtime(model, max_batch=2, max_len=64, **kw)
    rt.prefill([list(range(1, 30)), list(range(2, 31))])
    for l in rt.net.layers:  # row 1's sequence went non-finite
        l.k[1] = float("nan")
        l.v[1] = float("inf")
    rt.reset([1], scrub=True)
    assert rt.lengths == [29, 0]
    rt.prefill([prompts[1]], rows=[1])
    got = rt.decode([3, 4])
    assert torch.isfinite(got).all()
    assert_close(got, want, torch.float32, "row 1 after a scrub, beside a longer row 0")


@pytest.mark.parametrize("rows", [[-1], [2], [0, 5]])
def test_reset_refuses_rows_it_does_not_have(rows: list[int]) -> None:
    rt = Runtime(tiny_model().eval(), max_batch=2, max_len=16, kernels="torch", native=False)
    rt.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="rows are 0..1"):
        rt.reset(rows, scrub=True)
    assert rt.lengths == [3, 2]  # nothing was reset (-1 used to reset the last row)
