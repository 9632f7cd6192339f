"""The OpenAI request bodies the server accepts, its limits, and the checks a request passes before it
takes a slot.

Bodies are strict pydantic models ("12" is not an integer, "yes" is not a boolean, NaN is not a number).
Sampling takes OpenAI's fields (temperature, top_p, seed, stop, presence_penalty, frequency_penalty,
logit_bias) and vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos)
with their meanings (layerfold.inference.controls). A field OpenAI defines that this server does not
implement (tools, response_format, best_of, ...) answers 400 naming it, unless it holds its no-op
value: silently ignoring it would give a different answer than the client asked for. A few fields that
cannot change an answer (``user``, ``metadata``, ...) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from layerfold.inference.controls import MAX_LOGIT_BIAS, TEMPERATURE_FLOOR
from layerfold.serving.request import MAX_LOGPROBS, MAX_STOP, MAX_STOP_CHARS, SEED_RANGE

__all__ = ["ApiError", "ChatBody", "CompletionBody", "Limits", "chat_messages", "check_body", "check_prompt",
           "check_text", "error_response", "on_api_error", "on_crash", "on_http", "on_invalid", "prompt_list",
           "check_choices", "sampling_fields", "stop_list"]


class ApiError(Exception):
    """An answer other than 200: the status and OpenAI's error object (``param`` names the field at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    def text(s: str | None) -> str | None:  # an unpaired surrogate from the request (a field's name) cannot be UTF-8
        return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")

    return JSONResponse({"error": {"message": text(message), "type": type_, "param": text(param), "code": code}},
                        status)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. max_len: cache slots per request (prompt + completion);
    max_prompt_tokens / max_tokens: the longest prompt and completion; max_prompts: prompts per
    completions request; max_body_bytes: the request body (larger answers 413 before it is parsed)."""

    max_len: int
    max_prompt_tokens: int
    max_tokens: int
    max_prompts: int = 64
    max_body_bytes: int = 4 * 2 ** 20

    @property
    def max_prompt_chars(self) -> int:
        """A prompt string longer than this is refused before tokenising: no tokenizer packs 64 characters
        into every token, so it could not fit max_prompt_tokens anyway."""
        return 64 * self.max_prompt_tokens


# ---- request bodies ----------------------------------------------------------------------------------
MAX_N = 128  # choices per prompt in a body (prompts x n is bounded by Limits.max_prompts)
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Float = Annotated[float, Field(allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against length side channels: none is sent anyway


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    temperature: Float = Field(1.0, ge=0.0, le=2.0, description=f"below {TEMPERATURE_FLOOR}: greedy")
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt; prompts x n at most max_prompts")
    stream: bool = False
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, description="0 or -1: every token")
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # the participant's name: passed to the chat template, which may show it
    refusal: str | None = None  # an assistant's refusal: what it said, so its content for the template
    tool_calls: list[Any] | None = None  # refused when it holds any (chat_messages): no tools run here
    function_call: dict[str, Any] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# Fields OpenAI defines that this server does not implement, with the values that ask for nothing.
NOOP = {"best_of": (1,), "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
        "response_format": ({"type": "text"},), "suffix": ("",), "prediction": (), "audio": (),
        "modalities": (["text"],), "reasoning_effort": (), "web_search_options": ()}
# Fields that cannot change an answer: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier"})


def check_body(body: _Common, model_name: str) -> None:
    """404 for another model's name; 400 naming the first field this server would have to ignore."""
    if body.model not in (None, "", model_name):
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}. "
                       f"Fix: pass model={model_name!r}", "model", "model_not_found")
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED or value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                                   for v in NOOP.get(name, ())):  # strict: false is not 0
            continue
        what = "is not supported by this server" if name in NOOP else "is not a field this server knows"
        raise ApiError(400, f"the field {name!r} {what}; ignoring it would not give the answer asked for. Fix: "
                       f"remove {name!r} from the request", name, "unsupported_field")
    if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true. Fix: add \"logprobs\": true", "top_logprobs")


def stop_list(body: _Common) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def sampling_fields(body: _Common, vocab_size: int) -> dict[str, Any]:
    """The scheduler Request's sampling controls from a body (absent fields: their no-op values); logit_bias
    keys must be token ids, as decimal text (JSON object keys are strings)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12) or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias key {key[:40]!r} is not a token id in [0, {vocab_size}). Fix: key the "
                           "biases by this model's token ids, e.g. {\"50256\": -100}", "logit_bias")
        bias[int(key)] = value
    if any(not 0 <= t < vocab_size for t in body.stop_token_ids or ()):  # here too: an echo-only request is not queued
        raise ApiError(400, f"stop_token_ids must hold token ids in [0, {vocab_size}). Fix: use this model's "
                       "tokenizer's ids", "stop_token_ids")
    return {"presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
            "logit_bias": bias, "top_k": body.top_k or 0, "min_p": body.min_p or 0.0,
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
            "min_tokens": body.min_tokens or 0, "stop_token_ids": list(body.stop_token_ids or []),
            "ignore_eos": bool(body.ignore_eos)}


def check_choices(prompts: int, n: int, limits: Limits) -> None:
    """400 when a request asks for more sequences (prompts x n) than one request may run."""
    if prompts * n > limits.max_prompts:
        raise ApiError(400, f"{prompts} prompt(s) x n={n} asks for {prompts * n} sequences; this server runs at most "
                       f"{limits.max_prompts} for one request. Fix: ask for fewer choices or split the request", "n")


def prompt_list(body: CompletionBody, limits: Limits) -> list[str | list[int]]:
    """The completions request's prompts (strings or token-id lists), checked for count and size."""
    p = body.prompt
    prompts: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise ApiError(400, "the prompt list is empty. Fix: send at least one prompt", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"got {len(prompts)} prompts; this server takes at most {limits.max_prompts} a request. "
                       "Fix: split them over several requests", "prompt")
    for x in prompts:
        if isinstance(x, str) and len(x) > limits.max_prompt_chars:
            raise ApiError(400, f"a prompt of {len(x)} characters cannot fit the limit of {limits.max_prompt_tokens} "
                           "tokens. Fix: shorten the prompt", "prompt", "context_length_exceeded")
        if isinstance(x, str):
            check_text(x, "prompt")
    return prompts


def chat_messages(body: ChatBody, limits: Limits) -> list[dict[str, str]]:
    """The chat request's messages for the chat template (content parts joined; ``developer`` is ``system``; an
    assistant's ``refusal`` is its content; a ``name`` is passed on for templates that show it); 400 for what the
    template would never see: an assistant's tool calls (no tools run here, so they would be dropped without a
    word), a message other than an assistant's with no content, or a refusal beside content."""
    for i, m in enumerate(body.messages):
        if m.tool_calls or m.function_call:
            f = "tool_calls" if m.tool_calls else "function_call"
            raise ApiError(400, f"messages.{i}.{f}: this server runs no tools, so the model cannot be shown the "
                           "assistant's calls. Fix: drop them from the conversation (keep the assistant's text)",
                           f"messages.{i}.{f}")
        if m.content is None and m.role != "assistant":
            raise ApiError(400, f"messages.{i} ({m.role}) has no content. Fix: send its text as \"content\"",
                           f"messages.{i}.content")
        if m.refusal is not None and (m.role != "assistant" or m.content):
            raise ApiError(400, f"messages.{i}.refusal: only an assistant's message without content may carry a "
                           "refusal (it is what the assistant said). Fix: send the text as \"content\" alone",
                           f"messages.{i}.refusal")
    msgs: list[dict[str, str]] = []
    for m in body.messages:
        text = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text or m.refusal or ""}
        if m.name is not None:
            msg["name"] = m.name
        msgs.append(msg)
    if sum(len(m["content"]) + len(m.get("name", "")) for m in msgs) > limits.max_prompt_chars:
        raise ApiError(400, f"the messages cannot fit the limit of {limits.max_prompt_tokens} tokens. Fix: "
                       "shorten them", "messages", "context_length_exceeded")
    for i, m in enumerate(msgs):
        for field in ("content", "name"):
            if field in m:
                check_text(m[field], f"messages.{i}.{field}")
    return msgs


def check_text(text: str, param: str) -> None:
    """400 for a string that is not Unicode text: JSON's \\ud800-\\udfff escapes unpaired (no tokenizer reads them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} holds an unpaired UTF-16 surrogate (\\u{ord(text[e.start]):04x} at character "
                       f"{e.start}), which is not text. Fix: send valid Unicode: escape a character beyond U+FFFF as a "
                       "high (\\ud800-\\udbff) and low (\\udc00-\\udfff) surrogate pair, or send it as UTF-8",
                       param) from None


def check_prompt(ids: list[int], max_tokens: int | None, limits: Limits, vocab_size: int,
                 param: str = "max_tokens") -> int:
    """The completion length to run for a tokenized prompt (``max_tokens`` or all the room left); ``param``: the
    field the client set it with (chat's ``max_completion_tokens``), named in the errors."""
    if not ids:
        raise ApiError(400, "the prompt is empty. Fix: send at least one token of prompt", "prompt")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab_size}). Fix: tokenize with this model's "
                       "tokenizer", "prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}. Fix: shorten the prompt", "prompt", "context_length_exceeded")
    room = limits.max_len - len(ids)
    if max_tokens is None:
        return min(limits.max_tokens, room)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{param}={max_tokens} is over this server's limit of {limits.max_tokens}. "
                       f"Fix: ask for at most {limits.max_tokens} tokens", param)
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {param}={max_tokens} exceeds the context of "
                       f"{limits.max_len} tokens. Fix: ask for at most {room} tokens", param, "context_length_exceeded")
    return max_tokens


# ---- the app's exception handlers -------------------------------------------------------------------
MAX_DEPTH = 64  # lists/objects nested in a request (a chat request with content parts is 5 deep)


def nesting(obj: Any, stop: int = MAX_DEPTH + 1) -> int:
    """How deep ``obj`` (parsed JSON) nests lists and dicts, counted level by level (no recursion) up to ``stop``."""
    depth, level = 0, [obj]
    while depth < stop:
        boxes = [x for x in level if isinstance(x, (list, dict))]
        if not boxes:
            break
        depth += 1
        level = [v for x in boxes for v in (x.values() if isinstance(x, dict) else x)]
    return depth


async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    depth = nesting(getattr(exc, "body", None))
    if depth > MAX_DEPTH:  # (Python's parser refuses such a body itself at a depth its version decides: 3.11 at
        # 3,000 levels, not 3.13; this answer does not depend on it)
        return error_response(400, "the request body nests lists or objects too deeply to parse (more than "
                              f"{MAX_DEPTH} levels). Fix: send the request's flat JSON object")
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        at = f" (character {loc[0]})" if loc else ""
        return error_response(400, f"the request body is not valid JSON: {why}{at}. Fix: send a JSON object with "
                              "Content-Type: application/json")
    msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                    for e in errs[:5])
    fix = ("correct the field(s) named" if loc else
           "send a JSON object such as {\"prompt\": \"Hello\"} with Content-Type: application/json")
    return error_response(400, f"invalid request: {msg}. Fix: {fix}", param=".".join(loc) or None)


async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


def _http_message(request: Request, exc: HTTPException) -> str:
    """Starlette's and FastAPI's bare details ("Not Found", "There was an error parsing the body"), explained."""
    cause, status = exc.__cause__, exc.status_code
    if status == 400 and isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start}). "
                "Fix: encode the JSON body as UTF-8")
    if status == 400 and isinstance(cause, RecursionError):
        return "the request body nests lists or objects too deeply to parse. Fix: send the request's flat JSON object"
    if status == 400 and isinstance(cause, ValueError) and "digits" in str(cause):
        return ("a number in the request body has thousands of digits. Fix: send numbers within their field's range "
                "(max_tokens, seed: 64-bit integers)")
    if status == 400 and cause is not None:
        return f"the request body could not be parsed ({type(cause).__name__}). Fix: send a JSON object in UTF-8"
    if status in (404, 405):
        return (f"{exc.detail}: {request.method} {request.url.path[:200]}. Fix: use POST /v1/completions, POST "
                "/v1/chat/completions, GET /v1/models, GET /health or GET /metrics")
    return str(exc.detail)


async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, _http_message(request, exc),
                          type_="invalid_request_error" if exc.status_code < 500 else "server_error")


async def on_crash(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")
