"""generate(): greedy equals the full forward's argmax, batching changes nothing, sampling, stop, EOS, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from layerfold import build_model, save_checkpoint
from layerfold.cli.main import main
from layerfold.core.model import Model
from layerfold.inference.controls import SamplingParams
from layerfold.inference.generate import encode_prompt, generate, stream_generate
from layerfold.inference.sampling import TextStream, sample_next
from tests.support.models import embedded_tokenizer, smollm2_vocab_spec, tiny_model

PROMPTS = ["Hi", "Write a haiku about the sea and the wind over it.", "What is 2+2?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model(smollm2_vocab_spec(max_position=512))


def test_greedy_equals_forward_argmax(model: Model, tok: Any) -> None:
    res = generate(model, tok, PROMPTS[1], max_new_tokens=12)[0]
    ids = encode_prompt(tok, PROMPTS[1])
    assert res.prompt_tokens == len(ids)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(res.token_ids)):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert res.token_ids == seq[len(ids):]
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
    assert res.finish_reason == "length" and len(res.token_ids) == 12


def test_batched_equals_unbatched(model: Model, tok: Any) -> None:
    batch = generate(model, tok, PROMPTS, max_new_tokens=10)
    for p, r in zip(PROMPTS, batch, strict=True):
        one = generate(model, tok, [p], max_new_tokens=10)[0]
        assert (r.prompt, r.token_ids, r.text) == (p, one.token_ids, one.text)


def test_sampling_is_seeded_per_prompt(model: Model, tok: Any) -> None:
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=123)
    a = generate(model, tok, PROMPTS, **kw)
    b = generate(model, tok, PROMPTS[2], **kw)
    assert a[2].token_ids == b[0].token_ids  # a prompt's draw does not depend on its batch
    assert [r.token_ids for r in a] == [r.token_ids for r in generate(model, tok, PROMPTS, **kw)]
    greedy = generate(model, tok, PROMPTS[0], max_new_tokens=8)[0]
    assert greedy.token_ids != generate(model, tok, PROMPTS[0], max_new_tokens=8, temperature=5.0, seed=1)[0].token_ids


@pytest.mark.parametrize("top_p", [1e-320, 1e-45, 1e-9])
def test_tiny_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    """A nucleus below every probability (down to a p that float32 rounds to 0) is the top token alone."""
    from layerfold.inference.sampling import sample_row

    logits = torch.tensor([0.5, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert {sample_row(logits, SamplingParams(1.0, top_p), g) for _ in range(20)} == {1}


def test_sample_next_rules() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = [torch.Generator().manual_seed(0), None]
    P = SamplingParams
    assert sample_next(logits, [P(0.0, 1.0), P(0.0, 1.0)], g) == [1, 0]
    # a nucleus this small keeps only the most likely token
    assert all(sample_next(logits, [P(1.0, 1e-6), P(1.0, 1e-6)], g) == [1, 0] for _ in range(20))
    draws = {sample_next(logits, [P(1.0, 0.8), P(1.0, 1.0)], g)[0] for _ in range(200)}
    assert draws == {1, 3}  # tokens 1 and 3 hold ~80% together; 0 and 2 are cut


def test_stop_string_and_stream(model: Model, tok: Any) -> None:
    full = generate(model, tok, PROMPTS[1], max_new_tokens=24)[0]
    text = full.text
    assert len(text) > 12
    stop = text[6:9]
    want = text[:text.find(stop)]
    pieces: list[str] = []
    res = generate(model, tok, PROMPTS[1], max_new_tokens=24, stop=["\x00never", stop],
                   stream=lambda i, d: pieces.append(d))[0]
    assert res.finish_reason == "stop" and res.text == want
    assert "".join(pieces) == want  # nothing of the stop string was streamed
    events = list(stream_generate(model, tok, PROMPTS[:2], max_new_tokens=6))
    for i in range(2):
        final = [e for e in events if e.index == i and e.finished]
        assert len(final) == 1 and final[0].result is not None
        assert "".join(e.delta for e in events if e.index == i) == final[0].result.text


def test_eos_stops(tok: Any) -> None:
    m = tiny_model(smollm2_vocab_spec(max_position=512))
    free = generate(m, tok, PROMPTS[0], max_new_tokens=8)[0]
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    m2 = build_model(smollm2_vocab_spec(max_position=512, eos_token_ids=(eos,)), state=m.state_dict()).eval()
    res = generate(m2, tok, PROMPTS[0], max_new_tokens=8)[0]
    assert res.finish_reason == "stop" and res.token_ids == free.token_ids[:first]


def test_text_stream_holds_partial_utf8_and_stop_prefix(tok: Any) -> None:
    ids = tok("héllo → wörld END more", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok, stop=["END"])
    out = ""
    for t in ids:
        d = ts.push(t)
        assert "\ufffd" not in d
        out += d
        if ts.stopped:
            break
    assert ts.stopped and out == ts.text == "héllo → wörld "


def test_chat_template_and_plain(tok: Any) -> None:
    chat = encode_prompt(tok, "Hi")
    plain = encode_prompt(tok, "Hi", chat=False)
    assert len(chat) > len(plain) and tok.decode(chat).rstrip().endswith("assistant")
    assert encode_prompt(tok, [{"role": "user", "content": "Hi"}]) == chat


def test_bad_arguments(model: Model, tok: Any) -> None:
    with pytest.raises(ValueError, match="Fix:"):
        generate(model, tok, "x", max_new_tokens=0)
    with pytest.raises(ValueError, match="Fix:"):
        generate(model, tok, "x", top_p=0.0)


def test_cli_generate(model: Model, tok: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    save_checkpoint(out, model.spec, model.state_dict(), tokenizer=tok)
    want = generate(model, tok, PROMPTS[0], max_new_tokens=5)[0].text
    assert main(["generate", str(out), PROMPTS[0], "--max-new-tokens", "5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["results"][0]["text"] == want and d["results"][0]["completion_tokens"] == 5
    assert main(["generate", str(out), PROMPTS[0], "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith(want)
    assert main(["generate", str(out), "x", "--max-new-tokens", "0"]) == 2


def test_a_failed_generate_leaves_its_runtime_clean(model: Model, tok: Any) -> None:
    """generate() that fails on NaN logits zeroes the runtime's cache rows (it may be reused: the cached one
    is), so the next call's shorter row beside a longer one is unharmed on the torch path."""
    from layerfold.inference.runtime import Runtime
    from layerfold.inference.sampling import SamplingError

    prompts = [PROMPTS[1], PROMPTS[0]]
    want = [r.text for r in generate(model, tok, prompts, max_new_tokens=6)]
    rt = Runtime(model, max_batch=2, max_len=256, kernels="torch", native=False)
    real = rt.decode

    def spoiled(*a: Any, **k: Any) -> torch.Tensor:
        for layer in rt.net.layers:
            if layer.k is not None:
                layer.k.fill_(float("nan"))
        return real(*a, **k)
    rt.decode = spoiled  # type: ignore[method-assign]
    with pytest.raises(SamplingError):
        generate(model, tok, [PROMPTS[1] * 3, PROMPTS[1]], max_new_tokens=6, runtime=rt)
    rt.decode = real  # type: ignore[method-assign]
    assert [r.text for r in generate(model, tok, prompts, max_new_tokens=6, runtime=rt)] == want


def test_generations_in_flight_together_do_not_share_a_cache(tok: Any) -> None:
    """A stream not yet finished, and a generate() from the same thread or another one meanwhile, each get
    their own text: the model's cached Runtime is lent to one generation at a time (they used to share
    it, each overwriting the other's rows)."""
    import threading

    model = tiny_model(smollm2_vocab_spec(max_position=512), std=0.5)  # its texts differ with the prompt
    a, b = "Tell me about the sea and the wind. " * 2, "What is 2+2?"
    want = {p: generate(model, tok, p, max_new_tokens=16)[0].token_ids for p in (a, b)}
    assert want[a] != want[b]

    def text(events: Any) -> list[int]:
        return next(e.result.token_ids for e in events if e.finished)

    outer = stream_generate(model, tok, a, max_new_tokens=16)
    first = next(outer)  # holds the cached runtime from here on
    assert generate(model, tok, b, max_new_tokens=16)[0].token_ids == want[b]  # nested, same thread
    assert text([first, *outer]) == want[a]

    both = threading.Barrier(2, timeout=30)
    got: dict[str, list[int]] = {}

    def run(p: str) -> None:
        it = stream_generate(model, tok, p, max_new_tokens=16)
        head = next(it)
        both.wait()  # both generations are in flight now
        got[p] = text([head, *it])
    threads = [threading.Thread(target=run, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
