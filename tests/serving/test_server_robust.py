"""Nothing one request carries knocks the server over: poison requests fail alone (4xx naming the field)
while other streams finish unchanged; every field of both endpoints with wrong types, out-of-range and
oversize values; the body limit; /health while busy; the API key, CORS and /metrics; a failure inside
a step failing only its own row. Loopback only."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")
pytest.importorskip("prometheus_client", reason="the serve extra brings prometheus_client")

from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.scheduler import Event, RequestError, Scheduler  # noqa: E402
from layerfold.serving.scheduler import Request as GenRequest  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model  # noqa: E402
from tests.support.server import running  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "tiny-robust"
BODY_LIMIT = 64 * 1024
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=1)


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    app = create_app(model, tok, model_name=NAME, max_batch=6, max_len=512, max_prompt_tokens=200,
                     max_tokens_limit=480, max_queue=64, max_body_bytes=BODY_LIMIT, max_prompts=8)
    with running(app) as url:
        yield url


def post(base: str, path: str, body: Any, raw: bool = False, **kw: Any) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(base + path, content=content, headers={"Content-Type": "application/json", **kw.pop(
        "headers", {})}, timeout=60, **kw)


def stream_text(base: str, body: dict[str, Any], last: list[float] | None = None) -> str:
    """A streamed completion's text (asserts it ends with [DONE]); appends the time of its end to ``last``."""
    out, done = [], False
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                msg = json.loads(line[6:])
                assert "error" not in msg, msg
                out.append(msg["choices"][0]["text"])
    assert done
    if last is not None:
        last.append(time.perf_counter())
    return "".join(out)


# Poison: each answers 4xx naming its field (or, for the temperature floor, a normal greedy answer).
P = "Once upon a time"
POISON = [
    ({"prompt": P, "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": P, "seed": -(2 ** 63) - 1}, 400, "seed"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ({"prompt": P, "temperature": 2.5}, 400, "temperature"),
    ({"prompt": P, "top_p": 0}, 400, "top_p"),
    ('{"prompt": "x", "top_p": NaN}', 400, "top_p"),
    ({"prompt": P, "stop": [str(i) for i in range(17)]}, 400, "stop"),
    ({"prompt": P, "stop": "s" * 257}, 400, "stop"),
    ({"prompt": P, "stop": ["a", "b" * 300]}, 400, "stop"),
    ({"prompt": P, "stop": ""}, 400, "stop"),
    ({"prompt": P, "stop": ["a", ""]}, 400, "stop"),
    ({"prompt": "word " * 3000}, 400, "prompt"),  # over the char bound: refused before tokenising
    ({"prompt": "hi " * 300}, 400, "prompt"),  # over max_prompt_tokens
    ({"prompt": [1, -5, 3]}, 400, "prompt"),
    ({"prompt": [1, 2, 49152]}, 400, "prompt"),
    ({"prompt": [[1, 2], [3, 10 ** 12]]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["a"] * 9}, 400, "prompt"),  # over max_prompts
    ({"prompt": P, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": P, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": P, "max_tokens": 481}, 400, "max_tokens"),
    ({"prompt": P, "n": 9}, 400, "n"),  # 1 prompt x 9 choices: over max_prompts (8)
    ({"prompt": P, "best_of": 3}, 400, "best_of"),
    ({"prompt": P, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": P, "logit_bias": {"49152": 1}}, 400, "logit_bias"),  # past the vocabulary
    ({"prompt": P, "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ({"prompt": P, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": P, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": P, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": P, "top_k": -2}, 400, "top_k"),
    ({"prompt": P, "min_p": 1.5}, 400, "min_p"),
    ({"prompt": P, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"prompt": P, "stop_token_ids": [49152]}, 400, "stop_token_ids"),
    ({"prompt": P, "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"prompt": P, "suffix": "end"}, 400, "suffix"),
    ({"prompt": P, "frobnicate": True}, 400, "frobnicate"),
    ({"prompt": P, "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x" * (BODY_LIMIT + 10)}, 413, None),
]
CHAT_POISON = [
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ({"messages": HI, "seed": 2 ** 70}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "z" * 20000}]}, 400, "messages"),
]


def check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Fix" in err["message"], err
    if param is not None:
        assert (err["param"] or "").startswith(param), err


def test_poison_requests_fail_alone_while_streams_run(base: str, model: Model, tok: Any) -> None:
    jobs = [(f"Story {i}: the dragon", 420 + 20 * i) for i in range(4)]
    want = [generate(model, tok, p, max_new_tokens=n, chat=False)[0].text for p, n in jobs]
    cases = [("/v1/completions", *c) for c in POISON] + [("/v1/chat/completions", *c) for c in CHAT_POISON]

    def fire(case: tuple[str, Any, int, str | None]) -> float:
        path, body, status, param = case
        check_error(post(base, path, body, raw=isinstance(body, str)), status, param)
        return time.perf_counter()

    ends: list[float] = []
    with ThreadPoolExecutor(4) as ex, ThreadPoolExecutor(6) as poison:
        streams = [ex.submit(stream_text, base, {"prompt": p, "max_tokens": n, "temperature": 0}, ends)
                   for p, n in jobs]
        time.sleep(0.05)  # the streams are in flight
        answered = list(poison.map(fire, cases, timeout=60))
        floor = post(base, "/v1/completions", {"prompt": P, "max_tokens": 8, "temperature": 1e-40})
        got = [f.result(timeout=120) for f in streams]
    assert got == want  # every well-formed stream finished, unchanged
    assert max(answered) < max(ends), "the streams ended before all poison was answered: make them longer"
    assert floor.status_code == 200  # below the temperature floor: greedy
    assert floor.json()["choices"][0]["text"] == generate(model, tok, P, max_new_tokens=8, chat=False)[0].text


# every field of both endpoints: wrong type, out of range
FIELDS = [
    ("/v1/completions", {"prompt": P}, [
        ("prompt", [5, None, {"a": 1}, [1.5], ["a", 1], [[1], "a"], True]),
        ("max_tokens", ["10", 1.5, -1, True]),
        ("temperature", ["hot", -0.1, 2.01, None and 0, [1]]),
        ("top_p", ["1", 0.0, 1.01, {}]),
        ("n", ["1", 0, 129, 1.0]),
        ("stream", ["yes", 1, []]),
        ("stop", [5, [1, 2], {"a": "b"}, ["x"] * 17]),
        ("seed", ["1", 1.5, 2 ** 64, True]),
        ("echo", ["true", 1]),
        ("logprobs", ["1", -1, 21, 1.5, True]),
        ("model", [5, ["a"]]),
        ("stream_options", ["x", [1]]),
    ]),
    ("/v1/chat/completions", {"messages": HI}, [
        ("messages", ["hi", [], [{"role": "wizard", "content": "x"}], [{"content": "x"}], [{"role": "user",
                                                                                            "content": 5}],
                      [{"role": "user", "content": [{"type": "image", "text": "x"}]}], [1]]),
        ("max_tokens", ["ten", 0, -3, 1.0]),
        ("max_completion_tokens", ["ten", 0]),
        ("temperature", ["x", 3]),
        ("top_p", [-1, "0.5"]),
        ("logprobs", ["true", 1]),
        ("top_logprobs", ["3", -1, 21]),
        ("seed", ["7", -(2 ** 64)]),
        ("stop", [3, [None]]),
        ("stream", ["no"]),
    ]),
]
CASES = [(path, base_body, name, v) for path, base_body, fields in FIELDS for name, values in fields
         for v in values if v is not None]


@pytest.mark.parametrize("path,body,field,value", CASES, ids=[f"{c[0][4:]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_every_field_wrong(base: str, path: str, body: dict[str, Any], field: str, value: Any) -> None:
    check_error(post(base, path, {**body, field: value}), 400, field)


def test_malformed_bodies(base: str) -> None:
    for raw in ('{"prompt": ', "null", "[]", '"text"', "{}", '{"prompt": "a"}' * 2, "\xff\xfe"):
        r = post(base, "/v1/completions", raw.encode("latin-1"), raw=True)
        assert r.status_code == 400, (raw, r.text)
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_body_limit_answers_413_before_reading(base: str) -> None:
    from layerfold.core.memstat import proc_status_bytes

    rss0 = proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    for _ in range(5):  # declared too large: refused from the header
        r = post(base, "/v1/completions", b"x" * (4 * BODY_LIMIT), raw=True)
        assert r.status_code == 413 and "Fix" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # streamed without Content-Length: refused once the count passes the limit
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 4096
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert time.perf_counter() - t0 < 10
    assert proc_status_bytes("VmRSS") - rss0 < 64 * 2 ** 20  # nothing of the rejected bodies is kept


def health_times(base: str, n: int = 10) -> list[float]:
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        took.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return took


def test_health_answers_fast_while_busy(base: str) -> None:
    """/health is answered between the busy requests' steps, not after them: their 250 tokens take seconds, a
    /health queued behind them as long. The bound is relative to /health on the idle server (a loaded CI machine
    makes both slower), with a floor."""
    idle = statistics.median(health_times(base))
    with ThreadPoolExecutor(6) as ex:
        busy = [ex.submit(post, base, "/v1/completions", {"prompt": f"Busy {i}", "max_tokens": 250, "temperature": 0})
                for i in range(4)]
        big = [ex.submit(post, base, "/v1/completions", {"prompt": "long words " * 1100, "max_tokens": 1})
               for _ in range(2)]  # tokenised off the event loop (then refused: over max_prompt_tokens)
        time.sleep(0.3)
        took = health_times(base)
        assert all(f.result(timeout=120).status_code == 200 for f in busy)
        assert all(f.result(timeout=120).status_code == 400 for f in big)
    assert statistics.median(took) < max(0.25, 5 * idle), f"/health took {took} (idle: {idle:.3f} s)"


def test_api_key_cors_and_open_health(model: Model, tok: Any) -> None:
    app = create_app(model, tok, model_name=NAME, max_batch=2, max_len=64, api_key="s3cret",
                     cors_origins=["http://ui.test"])
    with running(app) as url:
        assert httpx.get(url + "/health").status_code == 200  # open: load balancers probe it
        for auth in (None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2"):
            hdr = {"Authorization": auth} if auth else {}
            r = httpx.get(url + "/v1/models", headers=hdr)
            assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"], hdr
        assert httpx.get(url + "/metrics").status_code == 401
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=ok).status_code == 200
        r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=ok)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        pre = httpx.options(url + "/v1/completions", headers={"Origin": "http://ui.test",
                                                              "Access-Control-Request-Method": "POST",
                                                              "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.test"
        r = httpx.get(url + "/v1/models", headers={**ok, "Origin": "http://ui.test"})
        assert r.headers["access-control-allow-origin"] == "http://ui.test"
        r = httpx.get(url + "/v1/models", headers={**ok, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in r.headers


def test_metrics_in_prometheus_format(base: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert post(base, "/v1/completions", {"prompt": "count", "max_tokens": 5, "temperature": 0}).status_code == 200
    assert post(base, "/v1/completions", {"prompt": "x", "n": 0}).status_code == 400
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("layerfold_requests", "layerfold_prompt_tokens", "layerfold_generation_tokens",
                 "layerfold_queue_depth", "layerfold_active_requests", "layerfold_batch_size",
                 "layerfold_time_to_first_token_seconds", "layerfold_request_latency_seconds"):
        assert name in fams, name
    reqs = {(s.labels["endpoint"], s.labels["status"]): s.value for s in fams["layerfold_requests"].samples
            if s.name.endswith("_total")}
    assert reqs[("/v1/completions", "200")] >= 1 and reqs[("/v1/completions", "400")] >= 1
    gen = [s.value for s in fams["layerfold_generation_tokens"].samples if s.name.endswith("_total")]
    assert gen[0] >= 5
    ttft = {s.name: s.value for s in fams["layerfold_time_to_first_token_seconds"].samples}
    assert ttft["layerfold_time_to_first_token_seconds_count"] >= 1


# ---- a failure inside a step fails its own row only ----------------------------------------------------
def run_scheduler(sched: Scheduler, reqs: list[tuple[list[int], int]], poison: Any) -> list[list[Event]]:
    """Submit the requests to a started scheduler with ``poison(sched)`` applied; collect every event."""
    events: list[list[Event]] = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def emit_for(i: int) -> Any:
        def emit(ev: Event) -> None:
            events[i].append(ev)
            if ev.kind in ("done", "error"):
                done.release()
        return emit

    poison(sched)
    sched.start()
    try:
        sched.submit_all([GenRequest(ids, n, emit_for(i)) for i, (ids, n) in enumerate(reqs)])
        for _ in reqs:
            assert done.acquire(timeout=60), "a request never ended"
    finally:
        sched.stop()
    return events


def texts(events: list[Event]) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


@pytest.mark.parametrize("where", ["decode", "prefill"])
def test_nonfinite_logits_fail_only_their_row(model: Model, tok: Any, where: str) -> None:
    prompts = [tok.encode(f"Row {i} says") for i in range(3)]
    ref = run_scheduler(Scheduler(model, tok, max_batch=3, max_len=64), [(p, 12) for p in prompts], lambda s: None)
    bad = prompts[1]

    def poison(s: Scheduler) -> None:
        f = getattr(s.runtime, where)

        def spoiled(*a: Any, **k: Any) -> torch.Tensor:
            logits = f(*a, **k).clone()  # runtime outputs are inference tensors
            rows = [i for i, r in enumerate(s.slots[:logits.shape[0]]) if r is not None and r.prompt_ids == bad]
            if where == "prefill":
                rows = [i for i, p in enumerate(a[0]) if list(p) == bad]
            logits[rows] = float("nan")
            return logits
        setattr(s.runtime, where, spoiled)

    got = run_scheduler(Scheduler(model, tok, max_batch=3, max_len=64), [(p, 12) for p in prompts], poison)
    assert got[1][-1].kind == "error" and "NaN or Inf" in got[1][-1].text
    for i in (0, 2):
        assert got[i][-1].kind == "done" and texts(got[i]) == texts(ref[i])


def test_a_failed_rows_nan_cache_never_reaches_its_next_request(model: Model, tok: Any) -> None:
    """B's sequence goes non-finite (NaN logits, NaN left in its cache row) and fails; C then takes B's row
    beside the longer A. C's text must be what it is alone: the failed row was zeroed, so the masked stale
    slots C's attention skips hold no NaN (torch path: a masked 0 times NaN is NaN)."""
    a, b, c = tok.encode("A long prompt that keeps its row busy " * 3), tok.encode("B is about to fail " * 3), \
        tok.encode("C:")
    alone = run_scheduler(Scheduler(model, tok, max_batch=2, max_len=128), [(c, 8)], lambda s: None)
    assert alone[0][-1].kind == "done"

    def poison(s: Scheduler) -> None:
        f = s.runtime.decode

        def spoiled(*args: Any, **kw: Any) -> torch.Tensor:
            logits = f(*args, **kw).clone()
            row = next((i for i, r in enumerate(s.slots) if r is not None and r.prompt_ids == b), None)
            if row is not None and row < logits.shape[0]:
                for layer in s.runtime.net.layers:
                    if layer.k is not None:
                        layer.k[row] = float("nan")
                        layer.v[row] = float("nan")
                logits[row] = float("nan")
            return logits
        s.runtime.decode = spoiled  # type: ignore[method-assign]

    sched = Scheduler(model, tok, max_batch=2, max_len=128)
    assert sched.runtime.native is None, "this checks the torch path (the fp32 test model has no native step)"
    got = run_scheduler(sched, [(a, 40), (b, 20), (c, 8)], poison)
    assert got[1][-1].kind == "error" and "NaN or Inf" in got[1][-1].text
    assert got[0][-1].kind == "done"
    assert got[2][-1].kind == "done", texts(got[2]) + got[2][-1].text
    assert texts(got[2]) == texts(alone[0])


def test_prefill_error_fails_only_its_prompt(model: Model, tok: Any) -> None:
    prompts = [tok.encode(f"Prompt {i} is") for i in range(3)]

    def poison(s: Scheduler) -> None:
        f = s.runtime.prefill

        def flaky(ps: Any, rows: Any = None) -> torch.Tensor:
            if any(list(p) == prompts[0] for p in ps):
                raise RuntimeError("simulated kernel failure")
            return f(ps, rows=rows)
        s.runtime.prefill = flaky  # type: ignore[method-assign]

    got = run_scheduler(Scheduler(model, tok, max_batch=3, max_len=64), [(p, 6) for p in prompts], poison)
    assert got[0][-1].kind == "error"
    assert got[1][-1].kind == "done" and got[2][-1].kind == "done"


@pytest.mark.parametrize("field,value", [("seed", 2 ** 64), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("stop", ["s"] * 17), ("prompt_ids", [10 ** 9]), ("max_tokens", 10 ** 6),
                                         ("logprobs", 50), ("max_tokens", 0)])
def test_scheduler_refuses_before_queueing(model: Model, tok: Any, field: str, value: Any) -> None:
    sched = Scheduler(model, tok, max_batch=1, max_len=64)
    req = GenRequest([1, 2, 3], 4, lambda ev: None)
    setattr(req, field, value)
    with pytest.raises(RequestError) as e:
        sched.submit(req)
    assert e.value.param == ("prompt" if field == "prompt_ids" else field) and "Fix" in str(e.value)
    assert not sched.pending
