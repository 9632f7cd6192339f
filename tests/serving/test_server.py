"""The OpenAI-compatible server on loopback: the official client, streaming, 16 concurrent clients,
bad requests, and a disconnecting client freeing its slot."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
openai = pytest.importorskip("openai", reason="the dev extra (pip install -e '.[dev]') brings the openai client")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")

from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.server import create_app, serving_threads  # noqa: E402
from tests.support.models import server_model  # noqa: E402
from tests.support.server import running  # noqa: E402

NAME = "tiny-test"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=1)


@pytest.fixture(scope="module")
def server(model: Model, tok: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(model, tok, model_name=NAME, max_batch=8, max_len=1024, max_prompt_tokens=200,
                     max_tokens_limit=950, max_queue=64)
    with running(app) as base:
        yield base, app.state.scheduler


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)


def offline(model: Model, tok: Any, prompt: str, n: int, chat: bool = True) -> Any:
    return generate(model, tok, prompt, max_new_tokens=n, chat=chat)[0]


def test_openai_client_chat_plain_and_stream(server: tuple[str, Any], model: Model, tok: Any) -> None:
    base, _ = server
    c = client(base)
    want = offline(model, tok, "Tell me about the sea.", 12)
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me about the sea."}],
                                  max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage is not None and r.usage.completion_tokens == want.completion_tokens
    assert r.usage.prompt_tokens == want.prompt_tokens
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_openai_client_completions_models_health(server: tuple[str, Any], model: Model, tok: Any) -> None:
    base, _ = server
    c = client(base)
    want = offline(model, tok, "Once upon a time", 9, chat=False)
    r = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=9, temperature=0)
    assert r.choices[0].text == want.text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=9, temperature=0, stream=True))
    assert streamed == want.text
    assert [m.id for m in c.models.list()] == [NAME]
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 8


def test_sixteen_concurrent_clients(server: tuple[str, Any], model: Model, tok: Any) -> None:
    base, sched = server
    jobs = [(f"Question {i}: what is {i} plus {i * 3}?", 6 + i % 7, i % 2 == 0) for i in range(16)]
    want = [offline(model, tok, p, n).text for p, n, _ in jobs]

    def one(job: tuple[str, int, bool]) -> str:
        p, n, stream = job
        c = client(base)
        msgs = [{"role": "user", "content": p}]
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=NAME, messages=msgs, max_tokens=n, temperature=0, stream=True))
        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=n, temperature=0)
        return r.choices[0].message.content

    t0 = time.time()
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, jobs, timeout=120))
    assert got == want
    assert time.time() - t0 < 120
    assert sched.max_rows_in_step > 1  # requests really shared decode steps


def post(base: str, path: str, body: Any, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(base + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", '{"messages": [', 400, None),  # malformed JSON
    ("/v1/chat/completions", "null", 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 951}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HI}, 404, "model"),
    ("/v1/completions", {"prompt": 5}, 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
])
def test_bad_requests_get_4xx(server: tuple[str, Any], path: str, body: Any, status: int, param: str | None) -> None:
    base, _ = server
    r = post(base, path, body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    assert httpx.get(base + "/health").json()["status"] == "ok"  # still alive


def test_queue_full_answers_429(server: tuple[str, Any]) -> None:
    base, sched = server
    old = sched.max_queue
    sched.max_queue = 0
    try:
        r = post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    finally:
        sched.max_queue = old
    assert r.status_code == 429 and "busy" in r.json()["error"]["message"]


def test_client_disconnect_frees_the_slot(server: tuple[str, Any]) -> None:
    base, sched = server
    steps0 = sched.steps
    body = {"prompt": "Count forever:", "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
    deadline = time.time() + 15
    while sched.stats()["active"] or sched.stats()["queued"]:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)
    assert sched.steps - steps0 < 899  # stopped early: cancelled, not finished


def test_serving_threads_leave_a_core_to_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, want in ((8, 7), (2, 1), (1, 1)):
        monkeypatch.setattr(torch, "get_num_threads", lambda c=cores: c)
        assert serving_threads(None) == (want, cores)  # prefills keep every core
    assert serving_threads(None, "cuda:0") == (1, 1)  # the GPU computes: torch's default is kept
    assert serving_threads(3) == (3, 3)
    with pytest.raises(ValueError, match="--threads 0"):
        serving_threads(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert serving_threads(None) == (4, 4)  # the user's explicit choice is kept


def test_prefill_threads_apply_to_prefills_only(model: Model, tok: Any) -> None:
    from layerfold.serving.scheduler import Request as GenRequest
    from layerfold.serving.scheduler import Scheduler

    sched = Scheduler(model, tok, max_batch=2, max_len=64, prefill_threads=2)
    seen: dict[str, list[int]] = {"prefill": [], "decode": []}
    for name in seen:
        f = getattr(sched.runtime, name)

        def spy(*a: Any, _f: Any = f, _name: str = name, **k: Any) -> Any:
            seen[_name].append(torch.get_num_threads())
            return _f(*a, **k)
        setattr(sched.runtime, name, spy)
    done = threading.Event()
    events: list[Any] = []

    def emit(ev: Any) -> None:
        events.append(ev)
        if ev.kind != "delta":
            done.set()
    sched.start()
    try:
        sched.submit(GenRequest(tok.encode("Hello there"), 4, emit))
        assert done.wait(30), "no answer in 30 s"
    finally:
        sched.stop()
    assert events[-1].kind == "done" and events[-1].completion_tokens >= 1
    assert seen["prefill"] == [2]  # the prefill ran on its own thread count ...
    assert seen["decode"] and set(seen["decode"]) == {1}  # ... and the decode steps on the server's (one_thread)
