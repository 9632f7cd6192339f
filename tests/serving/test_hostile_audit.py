"""Hostile requests an audit found: chat messages the model's chat template refuses (Mistral's and Llama 2's
"roles must alternate") answered 500 "internal error" without a fix, and a ``max_completion_tokens`` over the
limit was reported as ``max_tokens``. Each now answers 400 naming the field that was sent, with a fix, and never
fails another request."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra brings fastapi (a bare GPU machine may lack it)")

from fastapi.testclient import TestClient  # noqa: E402

from layerfold.core.model import Model  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT = "/v1/chat/completions"
# The check Mistral's and Llama 2's templates make, in their words.
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=1)


def client(model: Model, tok: Any, template: str) -> Iterator[TestClient]:
    t = copy.deepcopy(tok)
    t.chat_template = template
    app = create_app(model, t, model_name="audit", max_batch=4, max_len=256, max_prompt_tokens=100,
                     max_tokens_limit=200, max_queue=16)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def strict(model: Model, tok: Any) -> Iterator[TestClient]:
    yield from client(model, tok, ALTERNATE)


def check_error(r: Any, status: int, param: str, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "Fix:" in err["message"], err
    for w in words:
        assert w in err["message"], err


@pytest.mark.parametrize("messages", [
    [USER, USER],
    [{"role": "assistant", "content": "hello"}],
    [USER, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
])
def test_messages_the_template_refuses_answer_400(strict: TestClient, messages: list[dict[str, str]]) -> None:
    r = strict.post(CHAT, json={"messages": messages, "max_tokens": 2})
    check_error(r, 400, "messages", "Conversation roles must alternate", "chat template")


def test_a_refused_conversation_fails_no_other_request(strict: TestClient) -> None:
    good = {"messages": [USER], "max_tokens": 8, "temperature": 0}
    bad = {"messages": [USER, USER], "max_tokens": 8}
    with ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(lambda body: strict.post(CHAT, json=body), [good, bad, good, bad, good]))
    assert [r.status_code for r in answers] == [200, 400, 200, 400, 200], [r.text for r in answers]
    texts = {r.json()["choices"][0]["message"]["content"] for r in answers if r.status_code == 200}
    assert len(texts) == 1  # greedy: the same answer each time, untouched by the refused ones
    assert strict.get("/health").json()["status"] == "ok"


def test_a_template_that_does_not_parse_stays_a_server_error(model: Model, tok: Any) -> None:
    """Not the client's fault: not reported as a bad request."""
    for c in client(model, tok, "{% for m in messages %}{{ m['content'] }"):
        r = c.post(CHAT, json={"messages": [USER], "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text


@pytest.mark.parametrize("body,param,words", [
    ({"max_completion_tokens": 300}, "max_completion_tokens", ("max_completion_tokens=300", "limit of 200")),
    ({"max_tokens": 5, "max_completion_tokens": 300}, "max_completion_tokens", ("max_completion_tokens=300",)),
    ({"max_tokens": 300}, "max_tokens", ("max_tokens=300",)),
])
def test_the_completion_length_field_sent_is_the_one_named(strict: TestClient, body: dict[str, int], param: str,
                                                          words: tuple[str, ...]) -> None:
    check_error(strict.post(CHAT, json={"messages": [USER], **body}), 400, param, *words)


def test_max_completion_tokens_past_the_context_is_named(model: Model, tok: Any) -> None:
    for c in client(model, tok, ALTERNATE):
        long = {"role": "user", "content": "word " * 90}  # about 90 of the 256 positions
        r = c.post(CHAT, json={"messages": [long], "max_completion_tokens": 200})
        check_error(r, 400, "max_completion_tokens", "plus max_completion_tokens=200 exceeds the context")
        assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("message,param,words", [
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                            "function": {"name": "f", "arguments": "{}"}}]},
     "messages.1.tool_calls", ("runs no tools",)),
    ({"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}},
     "messages.1.function_call", ("runs no tools",)),
    ({"role": "user"}, "messages.1.content", ("has no content",)),
    ({"role": "system", "content": None}, "messages.1.content", ("has no content",)),
])
def test_what_the_template_would_never_see_is_refused(strict: TestClient, message: dict, param: str,
                                                      words: tuple[str, ...]) -> None:
    """An assistant's tool calls (no tools run here: they would vanish from the prompt) and a message with no
    content other than an assistant's: 400 naming the field, before the template runs."""
    r = strict.post(CHAT, json={"messages": [USER, message], "max_tokens": 2})
    check_error(r, 400, param, *words)


def test_empty_tool_calls_and_an_assistant_without_content_are_served(strict: TestClient) -> None:
    msgs = [USER, {"role": "assistant", "content": None, "tool_calls": []}, USER]
    r = strict.post(CHAT, json={"messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text


# Raises (so the request answers 400 with these words) unless the template is shown the user's name and the
# assistant's refusal as its content.
SHOWN = ("{% for m in messages %}{% if m['role'] == 'user' and m.name != 'ann' %}{{ raise_exception('name lost') }}"
         "{% endif %}{% if m['role'] == 'assistant' and m['content'] != 'I will not' %}"
         "{{ raise_exception('refusal lost') }}{% endif %}[{{ m.name }}] {{ m['content'] }}\n{% endfor %}[assistant] ")


def test_a_name_and_a_refusal_reach_the_template(model: Model, tok: Any) -> None:
    """OpenAI's ``name`` (who speaks) and an assistant's ``refusal`` (what it said instead of content) were
    dropped without a word; now the template sees them."""
    ann = {"role": "user", "content": "hi", "name": "ann"}
    for c in client(model, tok, SHOWN):
        msgs = [ann, {"role": "assistant", "content": None, "refusal": "I will not"}, ann]
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = c.post(CHAT, json={"messages": [ann, {"role": "assistant", "content": None}, ann], "max_tokens": 2})
        check_error(r, 400, "messages", "refusal lost")  # the template's own check works: it saw no refusal
        check_error(c.post(CHAT, json={"messages": [USER], "max_tokens": 2}), 400, "messages", "name lost")


@pytest.mark.parametrize("message,param", [
    ({"role": "assistant", "content": "sure", "refusal": "I will not"}, "messages.1.refusal"),
    ({"role": "user", "content": "hi", "refusal": "no"}, "messages.1.refusal"),
    ({"role": "user", "content": "hi", "name": "\ud800"}, "messages.1.name"),
    ({"role": "user", "content": "hi", "name": 7}, "messages.1.name"),
])
def test_a_bad_name_or_refusal_is_named(strict: TestClient, message: dict, param: str) -> None:
    body = json.dumps({"messages": [USER, message], "max_tokens": 2})  # ASCII: a lone surrogate as its escape
    r = strict.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "Fix:" in r.json()["error"]["message"], r.text
