"""StreamedRuntime (weights in host memory, one layer on the device at a time): the same greedy tokens and
logits as the Runtime for every layer kind, generate() through it, and its refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from layerfold.core.loading import load_tokenizer, resolve
from layerfold.inference.generate import generate
from layerfold.inference.runtime import Runtime
from layerfold.inference.streamed_decode import StreamedRuntime, kv_bytes_per_row
from tests.support.models import RUNTIME_SPECS, smollm2_vocab_spec, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(vocab: int, lens: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]


def _greedy(rt: Any, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    logits = rt.prefill(prompts)
    toks, seen = [], [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        toks.append(nxt.tolist())
        logits = rt.decode(nxt.tolist(), active=[True] * len(prompts))
        seen.append(logits)
    return toks, seen


@pytest.mark.parametrize("name", sorted(RUNTIME_SPECS))
def test_greedy_tokens_and_logits_equal_the_runtime(name: str) -> None:
    """Prompts of different lengths (left-padded here, right-padded in the Runtime), every layer kind of the
    runtimes' test model (per-layer heads and widths, GQA, shortcut matrices, MLP-only and attention-only
    layers; q/k norm and qkv bias; sliding window and llama3 rope)."""
    spec = RUNTIME_SPECS[name]
    model = tiny_model(spec, seed=3)
    prompts = _prompts(spec.vocab_size, (3, 11, 7))
    ref_toks, ref_logits = _greedy(Runtime(model, max_batch=3, max_len=32, native=False), prompts, 10)
    srt = StreamedRuntime(model, "cpu", max_batch=3, max_len=32)
    toks, logits = _greedy(srt, prompts, 10)
    assert toks == ref_toks
    for a, b in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    ref_rt = Runtime(model, max_batch=3, max_len=32, native=False)
    _greedy(ref_rt, prompts, 10)
    assert srt.steps == 11 and srt.lengths == ref_rt.lengths[:3] == [3 + 10, 11 + 10, 7 + 10]  # one pass a step
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model is left where it was


def test_a_short_prompt_beside_a_long_one_gets_its_whole_context() -> None:
    """The padding has slots of its own: near the context's end a short prompt gets as many tokens as with the
    Runtime (and ``context_full`` the same), not fewer because the long prompt's padding took its room."""
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    model = tiny_model(smollm2_vocab_spec(max_position=64), seed=4)
    prompts = [[5], [7, 8, 9, 10, 11, 12]]
    ref = generate(model, tok, prompts, max_new_tokens=62, chat=False, temperature=1.0, seed=1)
    got = generate(model, tok, prompts, max_new_tokens=62, chat=False, temperature=1.0, seed=1, stream_to="cpu")
    assert [len(r.token_ids) for r in ref] == [62, 59] and [r.context_full for r in ref] == [False, True]
    assert [(r.token_ids, r.context_full) for r in got] == [(r.token_ids, r.context_full) for r in ref]


def test_generate_through_it_equals_the_default_runtime() -> None:
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    model = tiny_model(smollm2_vocab_spec(max_position=512))
    prompts = ["Hi", "Write a haiku about the sea and the wind over it."]
    ref = generate(model, tok, prompts, max_new_tokens=9, chat=False)
    kw = dict(max_new_tokens=9, chat=False, runtime=StreamedRuntime(model, "cpu", max_batch=2, max_len=64))
    got = generate(model, tok, prompts, **kw)
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == [(r.token_ids, r.text, r.finish_reason)
                                                                      for r in ref]
    sampled = dict(temperature=1.3, top_p=0.9, seed=7, max_new_tokens=6, chat=False)
    a = generate(model, tok, prompts, **sampled)
    b = generate(model, tok, prompts, runtime=StreamedRuntime(model, "cpu", max_batch=2, max_len=64), **sampled)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # the same seeded draws


def test_cli_generate_with_host_weights(tmp_path, capsys) -> None:
    """`layerfold generate --weights host`: the same completions as with the weights on the device, reported."""
    import json

    from layerfold import save_checkpoint
    from layerfold.cli.main import main

    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    model = tiny_model(smollm2_vocab_spec(max_position=512))
    ckpt = save_checkpoint(tmp_path / "m", model.spec, model.state_dict(), tokenizer=tok)
    runs = {}
    for w in ("device", "host"):
        assert main(["generate", str(ckpt), "Hi", "What is 2+2?", "--max-new-tokens", "6", "--json",
                     "--weights", w]) == 0
        runs[w] = json.loads(capsys.readouterr().out)
    assert runs["host"]["weights"]["place"] == "host" and runs["device"]["weights"]["place"] == "device"
    assert [r["text"] for r in runs["host"]["results"]] == [r["text"] for r in runs["device"]["results"]]
    assert all(r["completion_tokens"] == 6 or r["finish_reason"] == "stop" for r in runs["host"]["results"])


def test_refusals_name_the_fix() -> None:
    spec = RUNTIME_SPECS["hetero"]
    model = tiny_model(spec)
    srt = StreamedRuntime(model, "cpu", max_batch=2, max_len=8)
    with pytest.raises(ValueError, match="decode before prefill"):
        srt.decode([1, 2])
    with pytest.raises(ValueError, match="room for one new token"):
        srt.prefill([[1] * 8])
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        srt.prefill([[1, 300]])
    with pytest.raises(ValueError, match="3 prompts for a StreamedRuntime of 2 rows"):
        srt.prefill([[1], [2], [3]])
    with pytest.raises(ValueError, match="past the model's 256 positions"):
        StreamedRuntime(model, "cpu", max_len=257)
    srt.prefill([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="one token per prefilled row"):
        srt.decode([5])
    for _ in range(7):  # the short row (1 token, 2 of padding) has room until it holds 8 tokens of its own
        srt.decode([5, 6])
    assert srt.lengths == [10, 8]
    with pytest.raises(ValueError, match="every row holds max_len=8 tokens"):
        srt.decode([5, 6])
    with pytest.raises(ValueError, match="resets all its rows"):
        srt.reset([0])
    per_row = kv_bytes_per_row(spec, 8, torch.float32)  # K and V of the 4 attention layers, 8 slots, fp32
    assert per_row == sum(2 * l.n_kv_heads * l.head_dim * 8 * 4 for l in spec.layers if l.has_attn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(RUNTIME_SPECS))
def test_cuda_steps_match_the_host_forward(name: str) -> None:
    """On CUDA, weights in host memory: every step's logits match the fp32 forward on the CPU (teacher-forced
    with its greedy tokens), and the model's own weights stay in host memory."""
    spec = RUNTIME_SPECS[name]
    model = tiny_model(spec, seed=5, norm_gains=True)
    prompts = _prompts(spec.vocab_size, (7, 2, 11), seed=1)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(6):
            for s in seqs:
                s.append(int(model(torch.tensor([s]))[0, -1].argmax()))
        full = [model(torch.tensor([s]))[0] for s in seqs]
    rt = StreamedRuntime(model, "cuda", max_batch=3, max_len=32)
    logits = rt.prefill(prompts).cpu()
    for step in range(7):
        for i, p in enumerate(prompts):
            want = full[i][len(p) - 1 + step]
            err = float((logits[i] - want).abs().max() / want.abs().max())
            assert err < 2e-3, f"row {i} step {step}: relative logit error {err:.2e}"
        if step < 6:
            logits = rt.decode([s[len(p) + step] for p, s in zip(prompts, seqs, strict=True)]).cpu()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating() -> None:
    """Both runtimes (and so generate() with that many prompts) refuse a cache the machine cannot hold, naming
    its size and the fix, instead of dying out of memory; the Runtime refuses fractional sizes."""
    model = tiny_model(RUNTIME_SPECS["hetero"])
    rows = 10 ** 7  # 10M rows x 256 slots of this model's fp32 cache: about 1.8 TiB
    with pytest.raises(ValueError, match=r"10000000 rows x 256 tokens need a .* GiB KV cache.*Fix: generate for fewer"):
        Runtime(model, max_batch=rows, max_len=256)
    with pytest.raises(ValueError, match=r"10000000 rows x 256 tokens need a .* GiB KV cache.*Fix: generate for fewer"):
        StreamedRuntime(model, "cpu", max_batch=rows, max_len=256)
    with pytest.raises(TypeError, match="whole numbers of rows and slots"):
        Runtime(model, max_batch=2.5)


def test_generate_refuses_odd_lengths_and_two_runtimes() -> None:
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    model = tiny_model(smollm2_vocab_spec(max_position=64))
    for n in (2.5, True, "3", 0):
        with pytest.raises(ValueError, match="max_new_tokens=.* whole number >= 1. Fix"):
            generate(model, tok, [[5, 6]], max_new_tokens=n, chat=False)
    rt = StreamedRuntime(model, "cpu", max_batch=1, max_len=16)
    with pytest.raises(ValueError, match="runtime and stream_to were both given.*Fix"):
        generate(model, tok, [[5, 6]], max_new_tokens=2, chat=False, runtime=rt, stream_to="cpu")
