"""Hostile or careless input to `eval`, `bench`, `serve` (its start-up) and `demo`: each ends in one line naming
the cause and the fix, exit status 2, before the model is loaded (or a conversion, a generation or a compile
starts), and nothing of the user's is written or lost."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from layerfold.core.checkpoint import save_checkpoint
from tests.cli.test_cli_errors import cli, fails
from tests.support.models import tiny_model, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A 61-token model saved with the SmolLM2 tokenizer (49,152 tokens): the tokenizer files of another model."""
    m = tiny_model(tiny_spec(vocab=61, n_layers=2), seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("other") / "model", m.spec, m.state_dict(), tokenizer=tok)


# ---- eval ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (("--data", "SHORT", "--task", "ppl"), "none of its 1 documents falls in the 'val' split"),
    (("--data", "EMPTY"), "empty.txt: no text found"),
    (("--data", "BADMC", "--task", "mc"), "mc.jsonl:1: not a multiple-choice record"),
    (("--data", "ADIR"), "adir: is a directory, not a file"),
    (("--seq-len", "9000", "--task", "ppl"), "--seq-len 9000 is longer than .*context of 8192 positions.*"
                                             "--seq-len 8192 or less"),
    (("--seq-len", "16", "--max-tokens", "5", "--task", "ppl"), "max_tokens=5 is fewer than one perplexity window"),
    (("--seq-len", "1"), "argument --seq-len: 1 must be >= 2"),
    (("--batch-size", "0"), "argument --batch-size: 0 must be >= 1"),
    (("--mc-items", "-2"), "argument --mc-items: -2 must be >= 1"),
    (("--task", "bleu"), "unknown task.*bleu.*Fix: choose from ppl,mc"),
])
def test_eval_data_and_window_before_loading(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             no_load: None, args: tuple[str, ...], match: str) -> None:
    """Every data problem (a file with no 'val' document, an empty file, a broken MC record), a window past the
    model's context and a --max-tokens below one window were found only after loading the model (minutes for a
    large one); --seq-len 9000 on an 8,192-position model ran and printed a meaningless perplexity; a directory
    given as --data was called "no such file"; --seq-len 1 and --batch-size 0 named no fix."""
    files = {"SHORT": tmp_path / "short.txt", "EMPTY": tmp_path / "empty.txt", "BADMC": tmp_path / "mc.jsonl",
             "ADIR": tmp_path / "adir"}
    files["SHORT"].write_text("hello")
    files["EMPTY"].write_text("")
    files["BADMC"].write_text(json.dumps({"context": "a", "choices": ["x", "y"], "label": 5}) + "\n")
    files["ADIR"].mkdir()
    fails(capsys, "eval", ckpt, *[str(files.get(a, a)) for a in args], match=match, limit_s=10)


def test_eval_refuses_the_tokenizer_of_another_model(other_tok: Path, capsys: pytest.CaptureFixture,
                                                      no_load: None) -> None:
    """A checkpoint holding another model's tokenizer died in torch's "IndexError: index out of range in self"
    after the load."""
    fails(capsys, "eval", other_tok, "--task", "ppl", "--seq-len", "16", match="its tokenizer gives token id \\d+, "
          "past the model's vocabulary of 61. Fix: copy the tokenizer files", limit_s=10)


# ---- bench -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second,args,match", [
    ("nope", (), "nope: no such file or directory"),
    ("adir", (), "adir: a directory without config.json"),
    ("SAME", ("--prompt-len", "9000"), "prompt_len \\+ new_tokens = 9002 exceeds its 8192 positions.*Fix: lower "
                                       "--prompt-len / --new-tokens to sum to at most 8192"),
])
def test_bench_every_model_checked_before_the_first_is_built(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             no_load: None, second: str, args: tuple[str, ...],
                                                             match: str) -> None:
    """A second model that did not exist (or did not fit the prompt) was found only after the first one was
    loaded and its runtime compiled (half a minute for a tiny model, minutes for a real one)."""
    (tmp_path / "adir").mkdir()
    other = ckpt if second == "SAME" else tmp_path / second
    fails(capsys, "bench", ckpt, other, "--new-tokens", "2", "--repeats", "1", *args, match=match, limit_s=10)


@pytest.mark.parametrize("args,match", [
    (("--new-tokens", "1"), "argument --new-tokens: 1 must be >= 2"),
    (("--new-tokens", "-4"), "argument --new-tokens: -4 must be >= 2"),
    (("--prompt-len", "0"), "argument --prompt-len: 0 must be >= 1"),
    (("--repeats", "0"), "argument --repeats: 0 must be >= 1"),
    (("--repeats", "two"), "argument --repeats: 'two' is not a whole number"),
    (("--compile", "--batch-sizes", "1,4", "--static-batches", "4,8"),  # was silently dropped
     r"--static-batches \[8\]: a static graph serves batch sizes 2..4.*Fix: drop those sizes"),
])
def test_bench_counts_name_the_flag(ckpt: Path, capsys: pytest.CaptureFixture, no_load: None,
                                    args: tuple[str, ...], match: str) -> None:
    """They said "need new_tokens >= 2, prompt_len >= 1, repeats >= 1 and batch sizes >= 1. Fix: check the
    benchmark arguments", naming neither the flag nor the value at fault."""
    fails(capsys, "bench", ckpt, *args, match=match, limit_s=10)


# ---- serve (start-up) ------------------------------------------------------------------------------------
def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _serve_args(*argv: str) -> Any:
    from layerfold.cli.main import build_parser

    return build_parser().parse_args(["serve", "any", *argv])


def test_serve_threads_past_the_cpus() -> None:
    """--threads 100000 passed the check and crashed torch.set_num_threads (SIGSEGV)."""
    from layerfold.cli.serve import check_serve_args

    with pytest.raises(ValueError, match="--threads 100000: this machine has \\d+ CPUs. Fix: pass a thread count"):
        check_serve_args(_serve_args("--threads", "100000", "--port", _free_port()))


@pytest.mark.parametrize("args,match", [
    (("--max-body-mb", "inf"), "--max-body-mb inf must be a positive number.*Fix"),
    (("--host", ""), "--host '' is empty.*Fix: pass --host 127.0.0.1"),
    (("--host", "http://127.0.0.1"), "--host 'http://127.0.0.1' is not an address of this machine.*no scheme"),
    (("--cors-origins", "http://localhost:3000/"), "'http://localhost:3000/' is not an origin.*trailing slash"),
    (("--cors-origins", "localhost:3000"), "'localhost:3000' is not an origin"),
    (("--compile", "--static-batches", "1,64", "--max-batch", "16"), "--static-batches 1,64: a static batch lies in "
                                                                     r"2..16 \(--max-batch\)"),
])
def test_serve_startup_options_before_loading(ckpt: Path, capsys: pytest.CaptureFixture, no_load: None,
                                              args: tuple[str, ...], match: str) -> None:
    """--max-body-mb inf died in OverflowError after the load; an empty --host served on every interface; a host
    with a scheme was answered "choose another --port"; a CORS origin with a trailing slash (or none) never matches
    a browser's Origin header, so CORS was silently off; static batches past --max-batch were refused by the
    runtime only after the load."""
    pytest.importorskip("fastapi")
    fails(capsys, "serve", ckpt, "--port", _free_port(), *args, match=match, limit_s=10)


def test_serve_port_in_use_says_so(ckpt: Path, capsys: pytest.CaptureFixture, no_load: None) -> None:
    """It said "Address already in use" and to choose another port or another host."""
    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        fails(capsys, "serve", ckpt, "--port", str(port), match=f"port {port} is in use.*Fix: choose another --port",
              limit_s=10)


def test_serve_refuses_the_tokenizer_of_another_model(other_tok: Path, capsys: pytest.CaptureFixture,
                                                      no_load: None) -> None:
    """The server started and answered every request 400 ("tokenize with this model's tokenizer")."""
    pytest.importorskip("fastapi")
    fails(capsys, "serve", other_tok, "--port", _free_port(), match="past the model's vocabulary of 61", limit_s=10)


# ---- demo ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (("--skip", "generate,evals"), "--skip evals: no such stage. Fix: name stages among generate,eval,prune,bench"),
    (("--method", "nope"), "unknown method 'nope'"),
    (("--target", "99"), "removing 99 of 3 layers: impossible"),
    (("--out", "USERDIR"), "exists and was not written by layerfold"),
    (("--max-new-tokens", "0"), "argument --max-new-tokens: 0 must be >= 1"),
])
def test_demo_options_before_the_first_stage(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, no_load: None, args: tuple[str, ...],
                                             match: str) -> None:
    """A bad --method, --target or --out surfaced at stage 5, after the generation and the dense evaluation;
    a misspelt --skip stage was ignored (the stage ran)."""
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    fails(capsys, "demo", "--model", ckpt, "--quick", *[str(user) if a == "USERDIR" else a for a in args],
          match=match, limit_s=10)
    assert (user / "notes.txt").read_text() == "keep" and [p.name for p in user.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("cache", ["afile", "afile/sub"])
def test_demo_cache_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    """LAYERFOLD_CACHE naming a file: the default model was converted first (seconds here, minutes for a large
    GGUF), then saving it failed with "choose another --out", an option the user never gave."""
    import layerfold.core.loading as L

    monkeypatch.setattr(L, "read_gguf", lambda *a, **k: pytest.fail("converted before checking the cache"))
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / cache))
    fails(capsys, "demo", "--quick", match="the model cache .* \\(set by LAYERFOLD_CACHE\\) cannot be written.*Fix: "
          "set LAYERFOLD_CACHE to a writable directory", limit_s=10)
    assert (tmp_path / "afile").read_text() == "x"


def test_demo_after_an_interrupted_conversion(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, tok: Any) -> None:
    """A killed first run leaves a half-written conversion (a .tmp sibling) and a torn keys.json: the next run
    converts again, removes the leftover and goes on."""
    import layerfold.core.loading as L

    m = tiny_model(tiny_spec(vocab=len(tok), n_layers=2), seed=1)
    monkeypatch.setattr(L, "read_gguf", lambda path, **kw: (m.spec, m.state_dict(), tok))
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAYERFOLD_CACHE", str(cache))
    key = L.content_key(L.resolve_alias("smollm2-135m"))
    stem = L.resolve_alias("smollm2-135m").stem
    half = cache / f".{stem}-{key}{L.CONVERSION}.tmp-999999-abc"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    (cache / "keys.json").write_text("{torn")
    rc, _, err = cli(capsys, "demo", "--quick", "--json", "--skip", "generate,eval,prune,bench")
    assert rc == 0, err
    assert not half.exists() and (cache / f"{stem}-{key}{L.CONVERSION}" / "config.json").is_file()
    assert json.loads((cache / "keys.json").read_text())  # rewritten whole
