"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching Scheduler.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON and wrong types
answer 400 (not FastAPI's 422), limits answer 400, a full queue 429, an unknown model 404.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from layerfold.core.model import Model
from layerfold.inference.generate import encode_prompt
from layerfold.serving.scheduler import Event, QueueFull, Scheduler
from layerfold.serving.scheduler import Request as GenRequest

__all__ = ["ApiError", "create_app", "serve", "serving_threads"]


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.param, self.code, self.type)


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# ---- request bodies (strict: "12" is not an integer, "yes" is not a boolean) -------------------------
class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---- the app ---------------------------------------------------------------------------------------
def create_app(model: Model, tokenizer: Any, *, model_name: str = "layerfold", max_batch: int = 16,
               max_len: int = 1024, max_prompt_tokens: int | None = None, max_tokens_limit: int | None = None,
               max_queue: int = 64, compile: bool = False, static_batches: Sequence[int] = (),
               prefill_threads: int | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler thread (``app.state.scheduler``).

    max_len: cache slots per request (prompt + completion). max_prompt_tokens (default max_len - 1)
    and max_tokens_limit (default max_len - 1) bound a request; max_queue bounds requests waiting
    for a free slot. compile: torch.compile the decode step (CPU; compiled at start-up, before the first
    request is served: docs/PERFORMANCE.md gives the start-up time);
    static_batches: batch sizes with their own autotuned graph (see ``Runtime``). prefill_threads:
    torch CPU threads for prefills (default: the current count; see ``Scheduler``).
    """
    sched = Scheduler(model, tokenizer, max_batch=max_batch, max_len=max_len, max_queue=max_queue, compile=compile,
                      static_batches=static_batches, prefill_threads=prefill_threads)
    lim_prompt = min(max_prompt_tokens or max_len - 1, max_len - 1)
    lim_tokens = min(max_tokens_limit or max_len - 1, max_len - 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        yield
        sched.stop()

    app = FastAPI(title="layerfold", lifespan=lifespan)
    app.state.scheduler = sched

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('msg', '')}). Fix: send a JSON "
                          "object with Content-Type: application/json")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return _error(400, f"invalid request: {msg}", param=".".join(loc) or None)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), type_="invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **sched.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "layerfold"}]}

    def check(body: _Common, prompt_ids: list[int], max_tokens: int | None) -> int:
        if body.model not in (None, "", model_name):
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}. "
                           f"Fix: pass model={model_name!r}", "model", "model_not_found")
        if len(prompt_ids) == 0:
            raise ApiError(400, "the prompt is empty. Fix: send at least one token of prompt", "prompt")
        if len(prompt_ids) > lim_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most {lim_prompt}. "
                           "Fix: shorten the prompt", "prompt", "context_length_exceeded")
        room = max_len - len(prompt_ids)
        if max_tokens is None:
            return min(lim_tokens, room)
        if max_tokens > lim_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {lim_tokens}. "
                           f"Fix: ask for at most {lim_tokens} tokens", "max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens={max_tokens} exceeds the "
                           f"context of {max_len} tokens. Fix: ask for at most {room} tokens", "max_tokens",
                           "context_length_exceeded")
        return max_tokens

    async def run(request: Request, body: _Common, prompt_ids: list[int], max_tokens: int, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        req = GenRequest(prompt_ids, max_tokens, emit, temperature=body.temperature, top_p=body.top_p,
                         seed=body.seed, stop=stop)
        try:
            sched.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}. Fix: retry later", code="queue_full",
                           type_="rate_limit_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(request, req, queue, rid, created, model_name, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text: list[str] = []
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()  # the client went away: free its slot
                    return JSONResponse({}, 499)
                continue
            except asyncio.CancelledError:
                req.cancel()
                raise
            if ev.kind == "delta":
                text.append(ev.text)
            elif ev.kind == "error":
                raise ApiError(500, ev.text, type_="server_error")
            else:
                break
        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
        out = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None,
                      "finish_reason": ev.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": ev.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody) -> Any:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, f"got {len(p)} prompts; this server takes one prompt a request. Fix: send "
                               "the prompts as separate (concurrent) requests", "prompt")
            p = p[0]
        if isinstance(p, list):  # token ids
            if any(not 0 <= t < model.spec.vocab_size for t in p):  # type: ignore[operator]
                raise ApiError(400, f"prompt token ids must be in [0, {model.spec.vocab_size}). Fix: tokenize "
                               "with this model's tokenizer", "prompt")
            ids = list(p)  # type: ignore[arg-type]
        else:
            ids = encode_prompt(tokenizer, p, chat=False)  # type: ignore[arg-type]
        return await run(request, body, ids, check(body, ids, body.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody) -> Any:
        msgs = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(part.text for part in m.content)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            ids = encode_prompt(tokenizer, msgs, chat=True)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(request, body, ids, check(body, ids, mt), chat=True)

    return app


async def _sse(request: Request, req: GenRequest, queue: asyncio.Queue[Event], rid: str, created: int,
               model_name: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that goes away cancels it (frees its slot)."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({} if delta is None else {"content": delta})
            choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if ev.kind == "delta":
                yield chunk(ev.text, None)
            elif ev.kind == "error":
                err = {"error": {"message": ev.text, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            else:
                yield chunk(None, ev.finish_reason)
                if include_usage:
                    usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                             "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
                yield "data: [DONE]\n\n"
                return
    finally:
        req.cancel()  # no-op once finished; frees the slot when the client disconnected mid-stream


def serve(model: Model, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "layerfold",
          log_level: str = "info", **limits: Any) -> None:
    """Run the server in the foreground (blocks until interrupted)."""
    import uvicorn

    app = create_app(model, tokenizer, model_name=model_name, **limits)
    if limits.get("compile"):
        print(f"[layerfold] compiled in {app.state.scheduler.runtime.compile_s:.0f} s", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
