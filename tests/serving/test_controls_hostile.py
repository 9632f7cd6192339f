"""Hostile and odd uses of the sampling controls: every malformed value answers 400 naming its field, odd but
valid ones are served with vLLM's and OpenAI's meanings (equal to ``generate`` with the same controls, also
many at once, streamed, or carried by a prompt-scoring request), and TextStream's windowed decoding equals
decoding every id for tokenizers that clean up the decoded text."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the dev extra (pip install -e '.[dev]') brings the HTTP clients")
pytest.importorskip("uvicorn", reason="the serve extra brings uvicorn")

from layerfold import build_model  # noqa: E402
from layerfold.core.model import Model  # noqa: E402
from layerfold.inference.generate import generate  # noqa: E402
from layerfold.inference.sampling import TextStream, cleans_up  # noqa: E402
from layerfold.serving.scheduler import Event, Request, Scheduler  # noqa: E402
from layerfold.serving.server import create_app  # noqa: E402
from tests.support.models import server_model, smollm2_vocab_spec  # noqa: E402
from tests.support.server import running  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_LEN = 256
P = "The cat sat on the"


@pytest.fixture(scope="module")
def model() -> Model:
    return server_model(seed=5)


@pytest.fixture(scope="module")
def base(model: Model, tok: Any) -> Iterator[str]:
    with running(create_app(model, tok, model_name="tiny", max_batch=4, max_len=MAX_LEN)) as url:
        yield url


def post(base: str, body: Any, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(base + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


def text_of(base: str, **body: Any) -> str:
    r = post(base, {"prompt": P, "max_tokens": 6, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def refused(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, (field, r.status_code, r.text)
    err = r.json()["error"]
    assert (err["param"] or "").split(".")[0] == field and "Fix" in err["message"], (field, err)


def test_hostile_logit_bias_keys_and_sizes(base: str, tok: Any) -> None:
    for key in ("1e3", " 5", "5 ", "٥", "５", "-1", "+5", "0x5", "5.0", "", "49152", "9" * 40, "\u00b2"):
        refused(post(base, {"prompt": P, "max_tokens": 2, "logit_bias": {key: 1}}), "logit_bias")
    for value in ("1", True, None, 100.5, -101, [1]):
        refused(post(base, {"prompt": P, "max_tokens": 2, "logit_bias": {"5": value}}), "logit_bias")
    refused(post(base, {"prompt": P, "max_tokens": 2, "logit_bias": {str(i): 1 for i in range(301)}}), "logit_bias")
    assert text_of(base, logit_bias={str(i): 1 for i in range(300)})
    # "001234" is token 1234; "5" and "05" name one token, the later key's bias counting (as a repeated JSON key)
    assert text_of(base, logit_bias={"001234": 100}) == tok.decode([1234] * 6)
    assert text_of(base, logit_bias={"5": 100, "05": -100}) == text_of(base, logit_bias={"5": -100}) != \
        text_of(base, logit_bias={"5": 100})
    assert text_of(base, logit_bias={"49151": 100, "0": -100}) == tok.decode([49151] * 6) != ""


FIELDS = {"temperature": 0.5, "top_p": 0.5, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
          "presence_penalty": 0.5, "frequency_penalty": 0.5, "min_tokens": 1, "seed": 1, "ignore_eos": True,
          "stop_token_ids": [5], "logit_bias": {"5": 1}}


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "true", "\"1\"", "1e400", "[1]", "{}"])
def test_every_control_refuses_non_numbers(base: str, bad: str) -> None:
    for field in FIELDS:
        if field == "ignore_eos" and bad == "true":
            continue
        value = {"stop_token_ids": f"[{bad}]", "logit_bias": f"{{\"5\": {bad}}}"}.get(field, bad)
        body = f"{{\"prompt\": \"hi\", \"max_tokens\": 2, \"{field}\": {value}}}"
        refused(post(base, body), field)
    r = post(base, {"prompt": "hi", "max_tokens": 2, **FIELDS})
    assert r.status_code == 200, r.text


def test_a_tiny_repetition_penalty_is_served_as_asked(base: str, model: Model, tok: Any) -> None:
    """float32 made 1e-300 a 0: positive logits of seen tokens became +Inf and the min_tokens ban's -Inf times 0
    NaN, so the request failed (500, "the model produced NaN or Inf logits"). It lifts the seen tokens as any
    tiny penalty does."""
    ids = tok.encode(P) + [tok.eos_token_id] + tok.encode(" and the dog")
    want = generate(model, tok, [ids], max_new_tokens=6, repetition_penalty=1e-20, min_tokens=3)[0].text
    for extra in ({}, {"min_tokens": 3}):
        r = post(base, {"prompt": ids, "max_tokens": 6, "temperature": 0, "repetition_penalty": 1e-300, **extra})
        assert r.status_code == 200, r.text
        if extra:
            assert r.json()["choices"][0]["text"] == want
    r = post(base, {"prompt": ids, "max_tokens": 6, "temperature": 1.0, "seed": 3, "repetition_penalty": 1e-300})
    assert r.status_code == 200, r.text


def test_a_scoring_request_checks_and_ignores_the_controls(base: str) -> None:
    # echo with max_tokens 0 and no logprobs is answered without the scheduler: its fields are checked all the same
    r = post(base, {"prompt": P, "max_tokens": 0, "echo": True, "stop_token_ids": [49152]})
    refused(r, "stop_token_ids")
    plain = post(base, {"prompt": P, "max_tokens": 0, "echo": True, "logprobs": 2})
    shaped = post(base, {"prompt": P, "max_tokens": 0, "echo": True, "logprobs": 2, "min_tokens": 4,
                         "logit_bias": {"5": 100}, "repetition_penalty": 3, "presence_penalty": 2, "top_k": 1,
                         "stop_token_ids": [5], "ignore_eos": True})
    assert plain.status_code == shaped.status_code == 200, shaped.text
    assert plain.json()["choices"][0]["logprobs"] == shaped.json()["choices"][0]["logprobs"]  # the model's own


def test_min_tokens_against_the_room_left(base: str, tok: Any) -> None:
    chat = [{"role": "user", "content": "hi"}]
    refused(post(base, {"messages": chat, "min_tokens": MAX_LEN}, "/v1/chat/completions"), "min_tokens")
    ids = [tok.encode(" cat")[0]] * (MAX_LEN - 5)  # room for 5 tokens
    refused(post(base, {"prompt": ids, "max_tokens": None, "min_tokens": 6}), "min_tokens")
    r = post(base, {"prompt": ids, "max_tokens": None, "min_tokens": 5, "logit_bias": {str(tok.eos_token_id): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"


def test_stop_token_ids_with_ignore_eos_banned_and_min_tokens(model: Model, tok: Any) -> None:
    kw = dict(temperature=1.0, seed=7)  # seeded draws: the same tokens wherever nothing bans one
    free = generate(model, tok, [tok.encode(P)], max_new_tokens=10, **kw)[0].token_ids
    j = next(j for j in range(2, 10) if free[j] not in free[:j])
    eos = free[j]  # a model whose EOS the greedy completion reaches after j tokens
    m2 = build_model(smollm2_vocab_spec(n_layers=2, max_position=2048, eos_token_ids=(eos,)),
                     state=model.state_dict()).eval()
    with running(create_app(m2, tok, model_name="t2", max_batch=4, max_len=MAX_LEN)) as url:
        def ask(**extra: Any) -> dict[str, Any]:
            r = post(url, {"prompt": tok.encode(P), "max_tokens": 10, **kw, **extra})
            assert r.status_code == 200, r.text
            return r.json()

        def ntok(a: dict[str, Any]) -> int:
            return a["usage"]["completion_tokens"]

        assert ntok(ask()) == j + 1 and ask()["choices"][0]["finish_reason"] == "stop"  # (the EOS counts, as in vLLM)
        assert ntok(ask(ignore_eos=True)) == 10
        # vLLM: stop_token_ids end the completion also with ignore_eos, the EOS among them
        a = ask(ignore_eos=True, stop_token_ids=[eos])
        assert ntok(a) == j + 1 and a["choices"][0]["finish_reason"] == "stop"
        # min_tokens bans the stop tokens as it does EOS; a stop token banned by -100 is not drawn
        assert ntok(ask(ignore_eos=True, stop_token_ids=[eos], min_tokens=j + 2)) >= j + 2
        a = ask(stop_token_ids=[free[0]], logit_bias={str(free[0]): -100, str(eos): -100})
        assert a["choices"][0]["finish_reason"] == "length" and ntok(a) == 10  # (drawn, it would have stopped)
        # ignore_eos with a stop string: the string still ends it
        s = tok.decode(free[3:5])
        assert s.strip()
        a = ask(ignore_eos=True, stop=[s.strip()])
        assert a["choices"][0]["finish_reason"] == "stop" and s.strip() not in a["choices"][0]["text"]


def test_a_shaped_request_never_fails_its_batch(model: Model, tok: Any) -> None:
    """A tokenizer whose EOS id lies past the model's vocabulary (a mismatched pair): the min_tokens ban indexed
    it, and the IndexError of one request's shaping failed the whole decode step, its neighbour too."""
    class PastEos:
        eos_token_id = 60_000

        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

    done = threading.Semaphore(0)
    events: list[list[Event]] = [[], []]

    def emitter(i: int) -> Any:
        def emit(ev: Event) -> None:
            events[i].append(ev)
            if ev.kind in ("done", "error"):
                done.release()
        return emit

    ids = tok.encode(P)
    sched = Scheduler(model, PastEos(), max_batch=2, max_len=64)
    sched.start()
    try:
        sched.submit_all([Request(list(ids), 5, emitter(0), min_tokens=3, presence_penalty=1.0),
                          Request(list(ids), 5, emitter(1))])
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        sched.stop()
    assert [e[-1].kind for e in events] == ["done", "done"], [e[-1].text for e in events]
    assert "".join(e.text for e in events[1]) == generate(model, tok, [ids], max_new_tokens=5)[0].text
    assert events[0][-1].completion_tokens == 5


CONTROLS: list[dict[str, Any]] = [
    {}, {"repetition_penalty": 1.7}, {"presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"logit_bias": {11: -100.0, 30: 4.0}}, {"min_tokens": 7, "temperature": 0.9, "seed": 11},
    {"top_k": 3, "min_p": 0.2, "temperature": 1.3, "seed": 5}, {"repetition_penalty": 0.5, "frequency_penalty": 1.0},
    {"top_p": 0.5, "temperature": 0.8, "seed": 2, "logit_bias": {13: 2.5}},
]


def test_concurrent_requests_each_equal_generate(base: str, model: Model, tok: Any) -> None:
    prompts: list[Any] = [P, tok.encode("Once upon a time, there was")]  # text and token ids
    want = {}
    for i, kw in enumerate(CONTROLS):
        p = prompts[i % 2]
        want[i] = generate(model, tok, [p] if isinstance(p, list) else p, chat=False, max_new_tokens=8, **kw)[0].text

    def ask(i: int) -> str:
        kw = dict(CONTROLS[i])
        if "logit_bias" in kw:
            kw["logit_bias"] = {str(k): v for k, v in kw["logit_bias"].items()}
        r = post(base, {"prompt": prompts[i % 2], "max_tokens": 8, "temperature": 0, **kw,
                        "stream": i % 3 == 0})
        assert r.status_code == 200, r.text
        if i % 3:
            return r.json()["choices"][0]["text"]
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    with ThreadPoolExecutor(len(CONTROLS)) as pool:
        got = dict(zip(range(len(CONTROLS)), pool.map(ask, range(len(CONTROLS))), strict=True))
    assert got == want
    assert len(set(want.values())) >= 5  # the controls change the answers


# ---- TextStream with tokenizers that clean up their decoded text ------------------------------------------
CLEAN_TEXTS = ["it ' s fine . i do not know , do you ? yes ! we ' re here and they ' ve gone , isn ' t it .",
               "hello world ; it's a test . really ? no !  i'm sure you're right , isn't it . a ' b ' c"]


def _wordpiece(hf_cleanup: bool) -> Any:
    """A BERT-style tokenizer built here: WordPiece ("##" continuations, a space before every other token, its
    decoder's own per-token cleanup), an added non-special token, and transformers' whole-text cleanup or not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=160, special_tokens=["[UNK]", "[SEP]"])
    tk.train_from_iterator(CLEAN_TEXTS * 5, trainer)
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tk.add_tokens([AddedToken("<tool>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=hf_cleanup)


@pytest.mark.parametrize("hf_cleanup", [False, True])
def test_text_stream_equals_whole_decoding_with_cleanup(hf_cleanup: bool) -> None:
    """transformers' clean_up_tokenization_spaces rewrites the whole text (" ' s" -> "'s"): a window that starts
    at the apostrophe cannot see the space, so the streamed text kept "it ' s" where decoding gives "it's"."""
    tk = _wordpiece(hf_cleanup)
    assert cleans_up(tk) == hf_cleanup
    rng = random.Random(0)
    seqs = [tk(t, add_special_tokens=False)["input_ids"] for t in CLEAN_TEXTS]
    pieces = [tk.convert_tokens_to_ids(x) for x in ("'", "s", "t", ".", ",", "n", "it", "<tool>", "[SEP]", "re")]
    seqs += [[rng.choice(pieces) for _ in range(rng.randrange(1, 25))] for _ in range(60)]
    for ids in seqs:
        ts, out = TextStream(tk, stop=["XYZ"]), ""
        for n, t in enumerate(ids, 1):
            out += ts.push(t)
            whole = tk.decode(ids[:n], skip_special_tokens=True)
            assert ts.text == whole and whole.startswith(out), (tk.convert_ids_to_tokens(ids[:n]), out, whole)
        assert out + ts.flush() == tk.decode(ids, skip_special_tokens=True)


def test_the_embedded_tokenizer_keeps_the_window(tok: Any) -> None:
    calls: list[int] = []

    class Counting:
        clean_up_tokenization_spaces = tok.clean_up_tokenization_spaces

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    assert not cleans_up(tok)
    ids = tok.encode("It ' s here . Yes , do n't ! " * 20)
    ts = TextStream(Counting())
    for t in ids:
        ts.push(t)
    assert ts.text == tok.decode(ids) and max(calls[len(calls) // 2:]) <= 6
