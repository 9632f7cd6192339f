"""The server's sampling controls: each request's own (a shaped row never changes another row), equal to
``generate`` with the same controls, and the vLLM extensions ignore_eos, stop_token_ids and min_tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
openai = pytest.importorskip("openai", reason="the dev extra brings the openai client")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")

from layerfold import build_model  # noqa: E402
from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.scheduler import Event, Request, Scheduler  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model, smollm2_vocab_spec  # noqa: E402
from tests.support.server import running  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=3)


def run(sched: Scheduler, reqs: list[Request]) -> list[list[int]]:
    """Submit the requests together; each one's generated token ids (from its logprobs)."""
    done = threading.Semaphore(0)
    events: list[list[Event]] = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        def emit(ev: Event, i: int = i) -> None:
            events[i].append(ev)
            if ev.kind in ("done", "error"):
                done.release()
        r.emit, r.logprobs = emit, 0
    sched.start()
    try:
        sched.submit_all(reqs)
        for _ in reqs:
            assert done.acquire(timeout=60)
    finally:
        sched.stop()
    assert all(ev[-1].kind == "done" for ev in events), [ev[-1] for ev in events]
    got = [[lp.token for e in ev for lp in (e.logprobs or [])] for ev in events]
    # usage counts every sampled token, an ending EOS included (as vLLM and OpenAI do)
    assert [ev[-1].completion_tokens for ev in events] == [len(g) for g in got]
    return got


def test_each_request_keeps_its_own_controls(model: Model, tok: Any) -> None:
    p = tok.encode("The cat sat on the")
    plain = generate(model, tok, [p], max_new_tokens=10)[0].token_ids
    shaped_kw = dict(repetition_penalty=1.8, frequency_penalty=1.0, presence_penalty=0.5,
                     logit_bias={plain[0]: -100.0})
    shaped = generate(model, tok, [p], max_new_tokens=10, **shaped_kw)[0].token_ids
    assert shaped != plain
    reqs = [Request(list(p), 10, None, **shaped_kw), Request(list(p), 10, None),  # type: ignore[arg-type]
            Request(list(p), 10, None, top_k=1, temperature=1.5, seed=4)]  # type: ignore[arg-type]
    got = run(Scheduler(model, tok, max_batch=3, max_len=128), reqs)
    assert got[0] == shaped and got[1] == plain and got[2] == plain  # (top_k 1 at any temperature: the argmax)


def test_ignore_eos_stop_token_ids_and_min_tokens(model: Model, tok: Any) -> None:
    p = tok.encode("Once upon a time")
    kw = dict(temperature=1.0, seed=7)  # seeded draws: the same tokens wherever nothing bans one
    free = generate(model, tok, [p], max_new_tokens=12, **kw)[0].token_ids
    assert len(set(free)) >= 8
    eos = free[2]
    first = free.index(eos)
    m2 = build_model(smollm2_vocab_spec(n_layers=2, max_position=2048, eos_token_ids=(eos,)),
                     state=model.state_dict()).eval()
    sched = Scheduler(m2, tok, max_batch=4, max_len=128)
    j = next(j for j in range(first + 2, 12) if free[j] not in free[:j])
    got = run(sched, [Request(list(p), 12, None, **kw),  # type: ignore[arg-type]
                      Request(list(p), 12, None, ignore_eos=True, **kw),  # type: ignore[arg-type]
                      Request(list(p), 12, None, ignore_eos=True, stop_token_ids=[free[j]], **kw),  # type: ignore
                      Request(list(p), 12, None, min_tokens=first + 3, **kw)])  # type: ignore[arg-type]
    assert got[0] == free[:first + 1]  # ends at the EOS (which has its logprob entry and counts in usage, as in vLLM)
    ended = generate(m2, tok, [p], max_new_tokens=12, **kw)[0]
    assert ended.token_ids == free[:first] and ended.completion_tokens == first + 1
    assert got[1] == free and len(got[1]) == 12
    assert got[2] == free[:j + 1]
    assert len(got[3]) >= first + 3 and eos not in got[3][:first + 3]


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    with running(create_app(model, tok, model_name="tiny", max_batch=4, max_len=256)) as url:
        yield url


def test_openai_client_sends_the_controls(base: str, model: Model, tok: Any) -> None:
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    p = "The cat sat on the"
    want = generate(model, tok, p, chat=False, max_new_tokens=8, presence_penalty=1.5, frequency_penalty=0.5,
                    repetition_penalty=1.3, logit_bias={11: 5.0}, top_k=3)[0].text
    r = c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0, presence_penalty=1.5,
                             frequency_penalty=0.5, logit_bias={"11": 5}, extra_body={"repetition_penalty": 1.3,
                                                                                       "top_k": 3})
    assert r.choices[0].text == want
    r = c.completions.create(model="tiny", prompt=p, max_tokens=7, logit_bias={"1234": 100})
    assert r.choices[0].text == tok.decode([1234] * 7) and r.usage.completion_tokens == 7
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        c.completions.create(model="tiny", prompt=p, max_tokens=2, extra_body={"min_tokens": 3})


@pytest.mark.parametrize("field,value,match", [("max_tokens", True, "whole number"),
                                               ("stop_token_ids", None, "list of token ids"),
                                               ("min_tokens", 9, "the 4 tokens this request can generate")])
def test_python_requests_are_checked_as_http_ones(model: Model, tok: Any, field: str, value: Any, match: str) -> None:
    from layerfold.serving.scheduler import RequestError

    sched = Scheduler(model, tok, max_batch=1, max_len=64)
    req = Request([1, 2, 3], 4, lambda ev: None)
    setattr(req, field, value)
    with pytest.raises(RequestError, match=match + ".*Fix") as e:
        sched.submit(req)
    assert e.value.param == field and not sched.pending


def test_n_choices_per_prompt(base: str, model: Model, tok: Any) -> None:
    """n samples of each prompt: choices prompt by prompt, the j-th seeded with seed + j (so they differ and each
    is generate()'s with that seed), the prompt counted once in usage."""
    prompts = ["The cat sat on the", "Once upon a time"]
    r = httpx.post(base + "/v1/completions", json={"prompt": prompts, "n": 3, "max_tokens": 6, "temperature": 1.0,
                                                   "seed": 5}, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    for c in r["choices"]:
        p, j = prompts[c["index"] // 3], c["index"] % 3
        assert c["text"] == generate(model, tok, p, chat=False, max_new_tokens=6, temperature=1.0, seed=5 + j)[0].text
    assert len({c["text"] for c in r["choices"][:3]}) > 1
    assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    assert r["usage"]["completion_tokens"] == 6 * 6
    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 1}
    whole = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).json()
    texts, roles = {0: "", 1: ""}, set()
    with httpx.stream("POST", base + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in __import__("json").loads(line[6:])["choices"]:
                    texts[c["index"]] += c["delta"].get("content") or ""
                    roles |= {c["index"]} if c["delta"].get("role") == "assistant" else set()
    assert roles == {0, 1} and [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert len(c.completions.create(model="tiny", prompt="x", n=4, max_tokens=2).choices) == 4
    with pytest.raises(openai.BadRequestError, match="sequences"):  # 3 x 30 over the 64 a request may run
        c.completions.create(model="tiny", prompt=["a", "b", "c"], n=30, max_tokens=2)


def test_a_prompt_sent_n_times_is_prefilled_once(model: Model, tok: Any) -> None:
    p = tok.encode("Once upon a time")
    sched = Scheduler(model, tok, max_batch=4, max_len=128)
    seen: list[int] = []
    real = sched.runtime.prefill

    def counting(prompts: Any, rows: Any = None) -> Any:
        seen.append(len(prompts))
        return real(prompts, rows=rows)

    sched.runtime.prefill = counting  # type: ignore[method-assign]
    kw = dict(temperature=1.0)
    got = run(sched, [Request(list(p), 8, None, seed=5 + j, **kw) for j in range(3)]  # type: ignore[arg-type]
              + [Request(tok.encode("Hello"), 8, None, seed=9, **kw)])  # type: ignore[arg-type]
    assert seen == [2]  # two distinct prompts, one prefill of both
    for j in range(3):
        assert got[j] == generate(model, tok, [p], max_new_tokens=8, seed=5 + j, **kw)[0].token_ids
    assert got[3] == generate(model, tok, [tok.encode("Hello")], max_new_tokens=8, seed=9, **kw)[0].token_ids
