"""The OpenAI surface clients expect: logprobs and top_logprobs (completions and chat, plain and streamed),
echo, prompt scoring with max_tokens 0, several and token-id prompts per request, no-op values of
unsupported fields accepted, max_model_len in /v1/models; the official client reads all of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
openai = pytest.importorskip("openai", reason="the dev extra (pip install -e '.[dev]') brings the openai client")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")

from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model  # noqa: E402
from tests.support.server import running  # noqa: E402
from tests.support.tolerances import approx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "tiny-surface"


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=2)


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    with running(create_app(model, tok, model_name=NAME, max_batch=4, max_len=256)) as url:
        yield url


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def reference_logprobs(model: Model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from the model's forward in fp64."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).double()[0], -1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_prompt_scoring_echo_max_tokens_0(base: str, model: Model, tok: Any) -> None:
    ids = tok.encode("The capital of France is Paris.")
    r = post(base, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})
    ch = r["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == tok.decode(ids) and ch["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == approx(reference_logprobs(model, ids).tolist(), torch.float32)
    assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"][1:],
                                                                             lp["token_logprobs"][1:], strict=True))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    plain = post(base, "/v1/completions", {"prompt": "Echo me", "max_tokens": 0, "echo": True})
    assert plain["choices"][0]["text"] == "Echo me" and plain["choices"][0]["logprobs"] is None


def test_echo_with_generation_and_logprobs(base: str, model: Model, tok: Any) -> None:
    """What lm-eval's loglikelihood requests send: echo, logprobs=1, max_tokens=1 (it drops the last entry)."""
    ids = tok.encode("Once upon a time there")
    r = post(base, "/v1/completions", {"prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 1,
                                       "temperature": 0})
    ch = r["choices"][0]
    want = generate(model, tok, tok.decode(ids), max_new_tokens=3, chat=False)[0]
    assert ch["text"] == tok.decode(ids) + want.text
    lp = ch["logprobs"]
    n_gen = r["usage"]["completion_tokens"]
    assert len(lp["token_logprobs"]) == len(ids) + n_gen + (want.finish_reason == "stop")  # an EOS has an entry
    assert lp["token_logprobs"][1:len(ids)] == approx(reference_logprobs(model, ids).tolist(), torch.float32)
    for v, top in zip(lp["token_logprobs"][len(ids):], lp["top_logprobs"][len(ids):], strict=True):
        assert v == max(top.values())  # greedy: each generated token is the most likely one


def test_generated_logprobs_are_the_models(base: str, model: Model, tok: Any) -> None:
    prompt = "Numbers: one two"
    r = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "logprobs": 3, "temperature": 0})
    ch = r["choices"][0]
    ids = tok.encode(prompt)
    gen = tok.encode(ch["text"])
    full = ids + gen
    assert ch["logprobs"]["token_logprobs"][:len(gen)] == approx(
        reference_logprobs(model, full)[len(ids) - 1:].tolist(), torch.float32)
    assert all(len(t) == 3 for t in ch["logprobs"]["top_logprobs"])


def test_chat_logprobs_plain_and_streamed(base: str) -> None:
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    r = post(base, "/v1/chat/completions", body)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) >= r["usage"]["completion_tokens"] >= 1
    assert all(set(c) == {"token", "logprob", "bytes", "top_logprobs"} and len(c["top_logprobs"]) == 2
               and c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content)
    assert "".join(c["token"] for c in content).startswith(r["choices"][0]["message"]["content"])
    streamed = []
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/chat/completions",
                                                 json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += lp["content"] if lp else []
    assert streamed == content
    plain = post(base, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("kind", ["strings", "token lists", "one token list"])
def test_several_prompts_per_request(base: str, model: Model, tok: Any, kind: str) -> None:
    texts = ["Alpha beta", "The sea is", "One, two, three,"]
    prompt: Any = {"strings": texts, "token lists": [tok.encode(t) for t in texts],
                   "one token list": tok.encode(texts[0])}[kind]
    n = 1 if kind == "one token list" else 3
    want = [g.text for g in generate(model, tok, texts[:n], max_new_tokens=5, chat=False)]
    r = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert [c["index"] for c in r["choices"]] == list(range(n))
    assert [c["text"] for c in r["choices"]] == want
    assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts[:n])
    got = [""] * n
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/completions",
                                                 json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                       "stream": True}) as s:
        lines = list(s.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    for line in lines:
        if line.startswith("data: {"):
            ch = json.loads(line[6:])["choices"][0]
            got[ch["index"]] += ch["text"]
    assert got == want


def test_noop_values_of_unsupported_fields_are_accepted(base: str) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "best_of": 1, "n": 1, "user": "someone", "suffix": None, "stream_options": None}
    assert post(base, "/v1/completions", body)["choices"][0]["finish_reason"] in ("stop", "length")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "metadata": {"a": "b"}}
    assert post(base, "/v1/chat/completions", chat)["choices"][0]["message"]["role"] == "assistant"


def test_models_lists_max_model_len(base: str) -> None:
    (m,) = httpx.get(base + "/v1/models").json()["data"]
    assert m["id"] == NAME and m["max_model_len"] == 256


def test_official_client_reads_logprobs_and_echo(base: str, tok: Any) -> None:
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    r = c.completions.create(model=NAME, prompt=["Hello there", "General"], max_tokens=0, echo=True, logprobs=1)
    assert [ch.text for ch in r.choices] == ["Hello there", "General"]
    assert r.choices[0].logprobs.token_logprobs[0] is None and len(r.choices[0].logprobs.tokens) == len(
        tok.encode("Hello there"))
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     logprobs=True, top_logprobs=1, temperature=0)
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].logprob == chat.choices[0].logprobs.content[0].logprob
    with pytest.raises(openai.BadRequestError, match="best_of"):
        c.completions.create(model=NAME, prompt="x", best_of=3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):  # a bias key that is no token id
        c.completions.create(model=NAME, prompt="x", logit_bias={"abc": 3})
