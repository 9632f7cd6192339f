"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching Scheduler.

Endpoints: ``POST /v1/completions`` (one or several prompts, text or token ids; ``echo``, ``logprobs``,
``max_tokens: 0`` with ``echo`` to score a prompt), ``POST /v1/chat/completions`` (``logprobs`` /
``top_logprobs``), both with ``stream: true`` as server-sent events ending in ``data: [DONE]``;
``GET /v1/models`` (with ``max_model_len``), ``GET /health``, ``GET /metrics`` (Prometheus).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON, wrong
types, limits and unsupported fields answer 400 naming the field, a body over the limit 413 (before it is
parsed), a missing API key 401, an unknown model 404, a full queue 429. One request's content never
fails another: everything that can fail is checked before it is queued, and inside the scheduler an
error fails only its own request. Tokenising runs on a worker thread, so the event loop (and /health)
never waits for a long prompt. Handlers are module-level functions over ``app.state.lf`` (ServerState).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from layerfold.core.model import Model
from layerfold.inference.generate import encode_prompt
from layerfold.serving.metrics import CONTENT_TYPE_LATEST, Metrics
from layerfold.serving.middleware import ApiKey, BodyLimit, CountRequests
from layerfold.serving.openai_format import chat_logprobs, completion_logprobs, merge_completion_logprobs, sse, usage
from layerfold.serving.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    Limits,
    chat_messages,
    check_body,
    check_choices,
    check_prompt,
    on_api_error,
    on_crash,
    on_http,
    on_invalid,
    prompt_list,
    sampling_fields,
    stop_list,
)
from layerfold.serving.request import SEED_RANGE
from layerfold.serving.scheduler import Event, QueueFull, RequestError, Scheduler
from layerfold.serving.scheduler import Request as GenRequest

__all__ = ["ApiError", "Limits", "ServerState", "create_app", "serve", "serving_threads"]


def serving_threads(requested: int | None, device: str = "cpu") -> tuple[int, int]:
    """Torch CPU threads for a server's (decode steps, prefills): ``requested`` for both when given.
    Else, on CPU, the decode steps get one fewer than torch's default (at least 1), so that the HTTP
    side (event loop, server-sent events) has a core of its own: torch's threads spin between the many
    small parallel regions of a decode step, and a request's streaming that preempts one of them
    stalls the whole step (measured with ``bench/bench_server.py --process`` with and without ``--threads``;
    docs/PERFORMANCE.md, "Serving"). Prefills, a few large matrix products, keep every core.
    ``OMP_NUM_THREADS`` set in the environment is taken as the user's choice and kept for both."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested} must be >= 1. Fix: pass a positive thread count, or leave it "
                             "out for one fewer than the cores")
        return requested, requested
    n = torch.get_num_threads()
    if not str(device).startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return n, n
    return max(1, n - 1), n


@dataclass
class ServerState:
    """What the handlers share (``app.state.lf``)."""

    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    limits: Limits
    vocab_size: int
    metrics: Metrics
    tokenize_pool: ThreadPoolExecutor  # one thread: tokenising never blocks the event loop, and is bounded


@dataclass
class Job:
    """One prompt of a request: what to generate and what to echo."""

    ids: list[int]
    max_tokens: int
    echo: str | None = None  # the prompt's text, returned before the completion (completions' echo)
    sample: int = 0  # which of the prompt's n choices: its seed is the request's + sample; the first counts the prompt


def _state(request: Request) -> ServerState:
    return request.app.state.lf


router = APIRouter()


# ---- small endpoints ---------------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    st = _state(request)
    return {"status": "ok", "model": st.model_name, **st.scheduler.stats()}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    st = _state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "layerfold", "max_model_len": st.limits.max_len}]}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- generation --------------------------------------------------------------------------------------
async def _off_loop(st: ServerState, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(st.tokenize_pool, fn, *args)


def _encode_texts(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    return [list(p) if isinstance(p, list) else encode_prompt(tokenizer, p, chat=False) for p in prompts]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionBody) -> Any:
    st = _state(request)
    check_body(body, st.model_name)
    prompts = prompt_list(body, st.limits)
    check_choices(len(prompts), body.n, st.limits)
    ids = await _off_loop(st, _encode_texts, st.tokenizer, prompts)
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens=0 generates nothing. Fix: ask for at least 1 token, or add echo=true to "
                       "score the prompt", "max_tokens")
    jobs = []
    for p, x in zip(prompts, ids, strict=True):
        n = check_prompt(x, body.max_tokens, st.limits, st.vocab_size)
        echo = (p if isinstance(p, str) else await _off_loop(st, _decode, st.tokenizer, x)) if body.echo else None
        jobs += [Job(x, n, echo, j) for j in range(body.n)]  # choices in prompt order, then by sample
    return await _run(request, st, body, jobs, chat=False, logprobs=body.logprobs)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatBody) -> Any:
    st = _state(request)
    check_body(body, st.model_name)
    msgs = chat_messages(body, st.limits)
    check_choices(1, body.n, st.limits)
    try:
        ids = await _off_loop(st, encode_prompt, st.tokenizer, msgs, True)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None
    except Exception as e:
        raise _template_refused(e) from None
    mtc = body.max_completion_tokens is not None
    n = check_prompt(ids, body.max_completion_tokens if mtc else body.max_tokens, st.limits, st.vocab_size,
                     "max_completion_tokens" if mtc else "max_tokens")
    jobs = [Job(ids, n, None, j) for j in range(body.n)]
    return await _run(request, st, body, jobs, chat=True, logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def _template_refused(e: Exception) -> Exception:
    """400 for messages the model's chat template refuses (its ``raise_exception``: Mistral's and Llama 2's "roles
    must alternate"); any other error (a template that does not parse) stays the server's own (500)."""
    try:
        from jinja2.exceptions import TemplateError, TemplateSyntaxError
    except ImportError:  # no jinja2: the template never ran (transformers' own error says to install it)
        return e
    if not isinstance(e, TemplateError) or isinstance(e, TemplateSyntaxError):
        return e
    return ApiError(400, f"this model's chat template refuses the messages: {e}. Fix: change the messages as it asks "
                    "(e.g. alternate user and assistant turns), or send your own prompt text to /v1/completions",
                    "messages", "invalid_messages")


async def _run(request: Request, st: ServerState, body: Any, jobs: list[Job], *, chat: bool,
               logprobs: int | None) -> Any:
    """Submit every prompt of a request (all or none), then answer as JSON or server-sent events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(i: int) -> Any:
        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return emit

    controls = sampling_fields(body, st.vocab_size)
    reqs = [GenRequest(j.ids, j.max_tokens, emitter(i), temperature=body.temperature, top_p=body.top_p,
                       seed=_seed(body.seed, j.sample), stop=stop_list(body), logprobs=logprobs,
                       prompt_logprobs=logprobs is not None and j.echo is not None, **controls)
            for i, j in enumerate(jobs)]
    todo = [r for r, j in zip(reqs, jobs, strict=True) if j.max_tokens > 0 or r.prompt_logprobs]
    try:
        st.scheduler.submit_all(todo)
    except RequestError as e:
        raise ApiError(400, str(e), e.param) from None
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}. Fix: retry later", code="queue_full",
                       type_="rate_limit_error") from None
    for i, (r, j) in enumerate(zip(reqs, jobs, strict=True)):
        if r not in todo:  # echo of max_tokens 0 without logprobs: nothing to compute
            queue.put_nowait((i, Event("done", finish_reason="length", prompt_tokens=len(j.ids))))
    answer = _Answer(st, jobs, chat, logprobs is not None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(request, reqs, queue, answer, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    left, check_at = len(jobs), loop.time() + 0.25
    try:
        while left:
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                i, ev = -1, None
            if loop.time() >= check_at:  # every 0.25 s, also while tokens keep coming
                check_at = loop.time() + 0.25
                if await request.is_disconnected():
                    return JSONResponse({}, 499)  # the client went away: ``finally`` frees the slots
            if ev is None:
                continue
            if ev.kind == "error":
                raise ApiError(500, ev.text, type_="server_error")
            answer.add(i, ev)
            left -= ev.kind == "done"
    finally:
        for r in reqs:
            r.cancel()  # no-op once finished; frees the others' slots when one failed or the task was cancelled
    return answer.body()


def _seed(seed: int | None, sample: int) -> int | None:
    """The seed of a prompt's ``sample``-th choice: the request's plus the sample (minus, past the top of the
    range), so n choices of one seeded request differ and each is reproducible."""
    if seed is None or sample == 0:
        return seed
    return seed + sample if seed + sample <= SEED_RANGE[1] else seed - sample


class _Answer:
    """The choices of one request, built from its prompts' events (index = the job's position: prompt by prompt,
    n choices each)."""

    def __init__(self, st: ServerState, jobs: list[Job], chat: bool, logprobs: bool):
        self.st, self.jobs, self.chat, self.want_lp = st, jobs, chat, logprobs
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text = [j.echo or "" for j in jobs]
        self.lp: list[Any] = [None] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)
        self.tokens = [0, 0]

    def logprobs(self, i: int, entries: list[Any] | None, offset: int) -> Any:
        if not self.want_lp or entries is None:
            return None
        tok = self.st.tokenizer
        return chat_logprobs(tok, entries) if self.chat else completion_logprobs(tok, entries, offset)

    def add(self, i: int, ev: Event) -> tuple[str, Any]:
        """Record an event; return (new text, its logprobs) for streaming."""
        offset = len(self.text[i]) if ev.kind != "prompt" else 0
        lp = self.logprobs(i, ev.logprobs, offset)
        if lp is not None:
            if self.chat:
                self.lp[i] = {"content": (self.lp[i] or {"content": []})["content"] + lp["content"]}
            else:
                self.lp[i] = merge_completion_logprobs(self.lp[i], lp)
        if ev.kind == "delta":
            self.text[i] += ev.text
        elif ev.kind == "done":
            self.finish[i] = ev.finish_reason
            self.tokens[0] += ev.prompt_tokens if self.jobs[i].sample == 0 else 0  # a prompt counts once, as OpenAI
            self.tokens[1] += ev.completion_tokens
            self.st.metrics.finished(ev.prompt_tokens, ev.completion_tokens, ev.ttft_s, ev.latency_s)
        return (ev.text if ev.kind == "delta" else ""), lp

    def choice(self, i: int, text: str | None, lp: Any, finish: str | None, delta: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if delta:
            return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                    "finish_reason": finish}
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish}

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.st.model_name}

    def body(self) -> dict[str, Any]:
        choices = [self.choice(i, self.text[i], self.lp[i], self.finish[i]) for i in range(len(self.jobs))]
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(*self.tokens)}


async def _stream(request: Request, reqs: Sequence[GenRequest], queue: asyncio.Queue[tuple[int, Event]],
                  answer: _Answer, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request's prompts; a client that goes away cancels them (frees their slots)."""
    obj = "chat.completion.chunk" if answer.chat else "text_completion"
    left = len(reqs)
    try:
        if answer.chat:
            for i in range(len(answer.jobs)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield sse({**answer.head(obj), "choices": [first]})
        for i, j in enumerate(answer.jobs):
            if j.echo and not reqs[i].prompt_logprobs:
                yield sse({**answer.head(obj), "choices": [answer.choice(i, j.echo, None, None)]})
        while left:
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if ev.kind == "error":
                yield sse({"error": {"message": ev.text, "type": "server_error", "param": None, "code": None}})
                return
            text, lp = answer.add(i, ev)
            if ev.kind == "prompt":
                text = answer.jobs[i].echo or ""
            if ev.kind == "done":
                left -= 1
                if lp is not None and (lp.get("content") or lp.get("tokens")):
                    yield sse({**answer.head(obj), "choices": [answer.choice(i, "", lp, None, delta=True)]})
                yield sse({**answer.head(obj), "choices": [answer.choice(i, None, None, ev.finish_reason, True)]})
            else:
                yield sse({**answer.head(obj), "choices": [answer.choice(i, text, lp, None, delta=True)]})
        if include_usage:
            yield sse({**answer.head(obj), "choices": [], "usage": usage(*answer.tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()  # no-op once finished; frees the slots when the client disconnected mid-stream


# ---- the app -----------------------------------------------------------------------------------------
def create_app(model: Model, tokenizer: Any, *, model_name: str = "layerfold", max_batch: int = 16,
               max_len: int = 1024, max_prompt_tokens: int | None = None, max_tokens_limit: int | None = None,
               max_queue: int = 64, compile: bool = False, static_batches: Sequence[int] = (),
               prefill_threads: int | None = None, max_body_bytes: int = 4 * 2 ** 20, max_prompts: int = 64,
               api_key: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler thread (``app.state.scheduler``).

    max_len: cache slots per request (prompt + completion). max_prompt_tokens (default max_len - 1)
    and max_tokens_limit (default max_len - 1) bound a request; max_queue bounds requests waiting
    for a free slot; max_body_bytes bounds a request body (413 above it); max_prompts bounds the prompts
    of one completions request. compile: torch.compile the decode step (CPU; compiled at start-up, before
    the first request is served: docs/PERFORMANCE.md gives the start-up time); static_batches: batch sizes
    with their own autotuned graph (see ``Runtime``). prefill_threads: torch CPU threads for prefills
    (default: the current count; see ``Scheduler``). api_key: required as ``Authorization: Bearer KEY`` on
    every path but /health. cors_origins: origins browsers may call from (CORS; none by default).
    """
    sched = Scheduler(model, tokenizer, max_batch=max_batch, max_len=max_len, max_queue=max_queue, compile=compile,
                      static_batches=static_batches, prefill_threads=prefill_threads)
    limits = Limits(max_len=max_len, max_prompt_tokens=min(max_prompt_tokens or max_len - 1, max_len - 1),
                    max_tokens=min(max_tokens_limit or max_len - 1, max_len - 1), max_prompts=max_prompts,
                    max_body_bytes=max_body_bytes)
    st = ServerState(sched, tokenizer, model_name, limits, model.spec.vocab_size, Metrics(sched),
                     ThreadPoolExecutor(1, thread_name_prefix="layerfold-tokenize"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        yield
        sched.stop()
        st.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="layerfold", lifespan=lifespan)
    app.state.scheduler, app.state.lf = sched, st
    app.add_exception_handler(RequestValidationError, on_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_crash)
    app.include_router(router)
    # the last added runs first: count every answer, CORS (preflights need no key), the key, the body limit
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(CountRequests, count=st.metrics.count_request)
    return app


def serve(model: Model, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "layerfold",
          log_level: str = "info", **limits: Any) -> None:
    """Run the server in the foreground (blocks until interrupted)."""
    import uvicorn

    app = create_app(model, tokenizer, model_name=model_name, **limits)
    if limits.get("compile"):
        print(f"[layerfold] compiled in {app.state.scheduler.runtime.compile_s:.0f} s", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
