"""16 and 64 concurrent clients, poison requests mixed in with well-formed ones (streamed and not, chat and
completions, several prompts, logprobs): every well-formed request gets exactly the offline answer, every
poison one its 4xx, and the server stays healthy. The 64-client run is ``slow``."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")

from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model  # noqa: E402
from tests.support.server import running  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

POISON = [  # (path, body, status)
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, 400),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 40}, 400),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"7": 900}}, 400),
    ("/v1/completions", '{"prompt": ', 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, 400),
]


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=5)


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    app = create_app(model, tok, model_name="tiny", max_batch=8, max_len=256, max_queue=512,
                     max_body_bytes=64 * 1024)
    with running(app) as url:
        yield url


def well_formed(i: int) -> tuple[str, dict[str, Any], list[tuple[str, int, bool]]]:
    """Request i and what it asks for: [(prompt, max_tokens, chat)] per prompt."""
    n = 4 + i % 9
    kind = i % 4
    if kind == 0:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Client {i} asks"}],
                                        "max_tokens": n, "temperature": 0, "stream": i % 8 == 0}, [
            (f"Client {i} asks", n, True)]
    if kind == 1:
        return "/v1/completions", {"prompt": f"Client {i} writes", "max_tokens": n, "temperature": 0,
                                   "stream": True}, [(f"Client {i} writes", n, False)]
    if kind == 2:
        ps = [f"Client {i} part {k}" for k in range(3)]
        return "/v1/completions", {"prompt": ps, "max_tokens": n, "temperature": 0}, [(p, n, False) for p in ps]
    return "/v1/completions", {"prompt": f"Client {i} scores", "max_tokens": n, "temperature": 0, "logprobs": 2,
                               "seed": i}, [(f"Client {i} scores", n, False)]


def send(base: str, path: str, body: Any) -> tuple[int, list[str]]:
    """(status, the choices' texts in index order) of a plain or streamed request."""
    raw = body if isinstance(body, str) else json.dumps(body)
    hdr = {"Content-Type": "application/json"}
    if isinstance(body, dict) and body.get("stream"):
        texts: dict[int, str] = {}
        with httpx.Client(timeout=120) as c, c.stream("POST", base + path, content=raw, headers=hdr) as r:
            if r.status_code != 200:
                return r.status_code, []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    texts[ch["index"]] = texts.get(ch["index"], "") + (
                        ch.get("text") or (ch.get("delta") or {}).get("content") or "")
        return 200, [texts[k] for k in sorted(texts)]
    r = httpx.post(base + path, content=raw, headers=hdr, timeout=120)
    if r.status_code != 200:
        return r.status_code, []
    return 200, [c.get("text", (c.get("message") or {}).get("content")) for c in r.json()["choices"]]


@pytest.mark.parametrize("clients", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_many_clients_with_poison_lose_nothing(base: str, model: Model, tok: Any, clients: int) -> None:
    good = [well_formed(i) for i in range(2 * clients)]
    flat = sorted({(p, n, chat) for _, _, want in good for p, n, chat in want})
    answers = {}
    for chat in (False, True):
        for n in sorted({n for _, n, c in flat if c == chat}):
            ps = [p for p, m, c in flat if m == n and c == chat]
            for p, g in zip(ps, generate(model, tok, ps, max_new_tokens=n, chat=chat), strict=True):
                answers[(p, n, chat)] = g.text
    work: list[tuple[str, Any, Any]] = [(path, body, want) for path, body, want in good]
    work += [(path, body, status) for k in range(clients) for path, body, status in [POISON[k % len(POISON)]]]
    random.Random(clients).shuffle(work)

    def one(job: tuple[str, Any, Any]) -> tuple[Any, int, list[str]]:
        path, body, want = job
        status, texts = send(base, path, body)
        return want, status, texts

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(one, work, timeout=600))
    took = time.perf_counter() - t0
    lost = [(want, status) for want, status, texts in results if isinstance(want, list) and
            (status != 200 or texts != [answers[w] for w in want])]
    wrong_poison = [(want, status) for want, status, _ in results if isinstance(want, int) and status != want]
    assert not lost, f"{len(lost)} well-formed requests lost or changed: {lost[:3]}"
    assert not wrong_poison, wrong_poison
    assert httpx.get(base + "/health").json()["status"] == "ok"
    print(f"\n{clients} clients: {len(good)} well-formed + {clients} poison requests in {took:.1f} s, none lost")
