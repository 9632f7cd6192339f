"""Hostile input the robustness tests do not cover: text that is not Unicode (unpaired surrogates), bodies
the JSON parser gives up on, unknown paths and methods, no-op values of the wrong type, a top_p that float32
rounds to 0, clients that go away while their request runs, and a request cancelled during its own
prefill. Each answers 4xx naming its cause with a fix, or frees its slot, and never fails another request."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")
pytest.importorskip("prometheus_client", reason="the serve extra brings prometheus_client")

from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.scheduler import Event, Scheduler  # noqa: E402
from layerfold.serving.scheduler import Request as GenRequest  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model  # noqa: E402
from tests.support.server import running  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
C, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=1)


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    app = create_app(model, tok, model_name="tiny-hostile", max_batch=4, max_len=512, max_prompt_tokens=200,
                     max_tokens_limit=480, max_queue=16, max_body_bytes=64 * 1024, max_prompts=8)
    with running(app) as url:
        yield url


def post_raw(base: str, path: str, raw: str | bytes) -> httpx.Response:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return httpx.post(base + path, content=data, headers={"Content-Type": "application/json"}, timeout=60)


def check_error(r: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert r.status_code == status, r.text
    err = json.loads(r.content.decode("utf-8"))["error"]  # strict UTF-8: the answer itself must be valid
    assert "Fix" in err["message"], err
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    for w in words:
        assert w in err["message"], err


@pytest.mark.parametrize("path,raw,param", [
    (C, '{"prompt": "\\ud800abc", "max_tokens": 2}', "prompt"),
    (C, '{"prompt": ["ok", "x\\udc00"], "max_tokens": 2}', "prompt"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', "messages.0.content"),
    (CHAT, '{"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": [{"type": "text", '
           '"text": "\\ud83d"}]}], "max_tokens": 2}', "messages.1.content"),
])
def test_unpaired_surrogates_answer_400(base: str, path: str, raw: str, param: str) -> None:
    check_error(post_raw(base, path, raw), 400, param, "surrogate")
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_a_surrogate_in_a_field_name_still_gives_a_valid_answer(base: str) -> None:
    r = post_raw(base, C, '{"prompt": "x", "stream_options": {"\\ud800": true}}')
    check_error(r, 400, "stream_options")


@pytest.mark.parametrize("raw,words", [
    ('{"prompt": "x", "seed": 1' + "0" * 5000 + "}", ("digits",)),
    ('{"prompt": ' + "[" * 3000 + "]" * 3000 + "}", ("deeply",)),
    (b'{"prompt": "\xff\xfe", "max_tokens": 1}', ("UTF-8", "0xff")),
    ('{"prompt": "x\x00"}', ("not valid JSON", "character")),
])
def test_bodies_the_parser_refuses_explain_why(base: str, raw: str | bytes, words: tuple[str, ...]) -> None:
    check_error(post_raw(base, C, raw), 400, None, *words)


def test_unknown_path_or_method_names_the_endpoints(base: str) -> None:
    check_error(httpx.get(base + C), 405, None, "POST /v1/completions")
    check_error(httpx.post(base + "/v1/embeddings", json={}), 404, None, "/v1/embeddings", "GET /v1/models")
    r = httpx.post(base + C, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    check_error(r, 400, None, "Content-Type: application/json")


@pytest.mark.parametrize("path,field,value", [
    (C, "presence_penalty", False), (C, "best_of", True), (CHAT, "frequency_penalty", False),
    (C, "stream_options", {"include_usage": "yes"}), (C, "stream_options", {"include_usage": 1}),
    (CHAT, "stream_options", {"include_usagee": True}),
])
def test_wrong_types_of_noop_and_option_values(base: str, path: str, field: str, value: Any) -> None:
    body = {"prompt": "x"} if path == C else {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(base + path, json={**body, "max_tokens": 1, field: value}, timeout=60)
    check_error(r, 400, field)


def test_stream_options_include_usage_still_works(base: str) -> None:
    body = {"prompt": "x", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}
    r = httpx.post(base + C, json=body, timeout=60)
    assert r.status_code == 200 and '"usage": {"prompt_tokens"' in r.text and r.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("top_p", [1e-320, 5e-324, 1e-46])
def test_top_p_below_float32_keeps_the_top_token(base: str, model: Model, tok: Any, top_p: float) -> None:
    r = httpx.post(base + C, json={"prompt": "Once upon", "max_tokens": 6, "top_p": top_p, "temperature": 1.0,
                                   "seed": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == generate(model, tok, "Once upon", max_new_tokens=6, chat=False)[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_frees_its_slot(model: Model, tok: Any, stream: bool) -> None:
    """A non-streamed request's tokens keep arriving; its disconnect must still be noticed (not only when idle)."""
    app = create_app(model, tok, max_batch=2, max_len=512)
    decode = app.state.scheduler.runtime.decode

    def slow(*a: Any, **k: Any) -> Any:  # 480 steps take ~2.5 s: long enough to leave in the middle
        time.sleep(0.005)
        return decode(*a, **k)
    app.state.scheduler.runtime.decode = slow
    body = json.dumps({"prompt": "Going away", "max_tokens": 480, "temperature": 0, "stream": stream}).encode()
    with running(app) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.3)
        deadline = time.time() + 30
        while (h := httpx.get(base + "/health").json())["active"]:
            assert time.time() < deadline, h
            time.sleep(0.02)
        assert h["steps"] < 300, f"the request ran {h['steps']} of its 480 steps though its client went away at 0.3 s"
        assert httpx.post(base + C, json={"prompt": "still here", "max_tokens": 3}, timeout=60).status_code == 200


def test_cancel_during_its_prefill_fails_no_other_request(model: Model, tok: Any) -> None:
    """A request cancelled while its prefill runs (its client left) must not leave a slot without tokens,
    which the next decode step would trip over, failing every request in it."""
    long_ids, quitter = tok.encode("A long story"), tok.encode("I will leave")
    want = generate(model, tok, [long_ids], max_new_tokens=40, chat=False)[0].text
    sched = Scheduler(model, tok, max_batch=2, max_len=128)
    events: list[Event] = []
    ended = threading.Event()
    going = GenRequest(quitter, 20, lambda ev: None)
    prefill = sched.runtime.prefill

    def cancelling(prompts: Any, rows: Any = None) -> Any:
        out = prefill(prompts, rows=rows)
        if any(list(p) == quitter for p in prompts):
            going.cancel()  # the client goes away while its prompt is being read
        return out
    sched.runtime.prefill = cancelling  # type: ignore[method-assign]

    def emit(ev: Event) -> None:
        events.append(ev)
        if ev.kind == "delta" and len(events) == 3:
            sched.submit(going)  # while the long request decodes
        if ev.kind in ("done", "error"):
            ended.set()

    sched.start()
    try:
        sched.submit(GenRequest(long_ids, 40, emit))
        assert ended.wait(60), "the request never ended"
        deadline = time.time() + 10
        while sched.stats()["active"]:
            assert time.time() < deadline, sched.stats()
            time.sleep(0.01)
    finally:
        sched.stop()
    assert events[-1].kind == "done", events[-1]
    assert "".join(e.text for e in events if e.kind == "delta") == want
