"""Hostile or malformed model files the damage tests do not cover: safetensors headers with negative shapes,
overlapping tensors, unknown dtypes or deep nesting; config.json values of the wrong type, NaN, or sizes
its weights cannot hold (refused before a spec of 10**9 layers is built); corrupt tokenizer files. Each
raises a CheckpointError naming the file and the fix, at once, and changes no file."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import layerfold
from layerfold.core.checkpoint import CheckpointError, open_weights, save_checkpoint
from layerfold.core.loading import load_tokenizer, verify_checkpoint
from tests.support.models import tiny_hf, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = tiny_model(n_layers=2, seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", m.spec, m.state_dict())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "llama"
    tiny_hf("llama").save_pretrained(out, safe_serialization=True)
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def files_of(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def refused(d: Path, fn: Callable[[], Any], *words: str) -> str:
    """``fn`` raises a CheckpointError with a fix and the words, quickly, leaving the directory as it was."""
    before, t0 = files_of(d), time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "Fix" in msg and all(w in msg for w in words), msg
    assert time.perf_counter() - t0 < 10 and files_of(d) == before
    return msg


# ---- safetensors headers ---------------------------------------------------------------------------
def rewrite_header(w: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    raw = w.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    w.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


def first(h: dict[str, Any]) -> dict[str, Any]:
    return h["embed.weight"]


HEADERS = {
    "negative shape": (lambda h: first(h).__setitem__("shape", [-s for s in first(h)["shape"]]), "whole numbers"),
    "float shape": (lambda h: first(h).__setitem__("shape", [float(s) for s in first(h)["shape"]]), "whole numbers"),
    "unknown dtype": (lambda h: first(h).__setitem__("dtype", "F8_E4M3"), "F8_E4M3"),
    "overlapping tensors": (lambda h: h.__setitem__("alias", dict(first(h))), "overlaps"),
    "metadata a list": (lambda h: h.__setitem__("__metadata__", [1]), "__metadata__"),
}


@pytest.mark.parametrize("how", list(HEADERS))
def test_bad_safetensors_header_is_named(ckpt: Path, tmp_path: Path, how: str) -> None:
    d = copy(ckpt, tmp_path)
    edit, word = HEADERS[how]
    rewrite_header(d / "model.safetensors", edit)
    refused(d, lambda: open_weights(d / "model.safetensors"), "model.safetensors", word)
    refused(d, lambda: verify_checkpoint(d), word)
    refused(d, lambda: layerfold.load(d, tokenizer=False), word)


def test_deeply_nested_header_is_not_a_recursion_error(ckpt: Path, tmp_path: Path) -> None:
    d = copy(ckpt, tmp_path)
    w = d / "model.safetensors"
    deep = b"[" * 100_000 + b"]" * 100_000
    w.write_bytes(len(deep).to_bytes(8, "little") + deep + w.read_bytes()[8:])
    refused(d, lambda: layerfold.load(d, tokenizer=False), "not JSON")


# ---- config.json of a checkpoint -------------------------------------------------------------------
SPEC_EDITS = {
    "norm_eps NaN": (lambda s: s.__setitem__("norm_eps", float("nan")), "norm_eps"),
    "norm_eps a string": (lambda s: s.__setitem__("norm_eps", "1e-5"), "norm_eps"),
    "rope_theta 0": (lambda s: s.__setitem__("rope_theta", 0), "rope_theta"),
    "vocab_size a float": (lambda s: s.__setitem__("vocab_size", float(s["vocab_size"])), "vocab_size"),
    "eos a string": (lambda s: s.__setitem__("eos_token_ids", "2"), "eos_token_ids"),
    "sliding_window negative": (lambda s: s.__setitem__("sliding_window", -1), "sliding_window"),
    "max_position negative": (lambda s: s.__setitem__("max_position", -5), "max_position"),
    "flag a string": (lambda s: s.__setitem__("tie_embeddings", "false"), "tie_embeddings"),
    "heads a float": (lambda s: s["layers"][0].__setitem__("n_heads", 4.0), "n_heads"),
    "has_attn a string": (lambda s: s["layers"][0].__setitem__("has_attn", "no"), "has_attn"),
    "layers a string": (lambda s: s.__setitem__("layers", "abc"), "layers"),
    "a layer a list": (lambda s: s["layers"].__setitem__(0, [1, 2]), "layers[0]"),
}


@pytest.mark.parametrize("how", list(SPEC_EDITS))
def test_wrong_spec_values_are_named(ckpt: Path, tmp_path: Path, how: str) -> None:
    d = copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit, word = SPEC_EDITS[how]
    edit(cfg["spec"])
    (d / "config.json").write_text(json.dumps(cfg))
    refused(d, lambda: layerfold.load(d, tokenizer=False), "config.json", word)


@pytest.mark.parametrize("text,word", [('{"format": "layerfold", "version": 1' + "0" * 5000 + "}", "corrupt JSON"),
                                       ("[" * 100_000 + "]" * 100_000, "corrupt JSON")])
def test_unparseable_config_is_named(ckpt: Path, tmp_path: Path, text: str, word: str) -> None:
    d = copy(ckpt, tmp_path)
    (d / "config.json").write_text(text)
    refused(d, lambda: layerfold.load(d, tokenizer=False), "config.json", word)


def test_provenance_must_be_an_object(ckpt: Path, tmp_path: Path) -> None:
    d = copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["provenance"] = [1]
    (d / "config.json").write_text(json.dumps(cfg))
    refused(d, lambda: layerfold.load(d, tokenizer=False), "provenance")


# ---- config.json of an HF directory ----------------------------------------------------------------
HF_EDITS = {
    "10**9 layers": ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers=1000000000"),
    "10**7 layers": ({"num_hidden_layers": 10 ** 7}, "safetensors files hold"),
    "hidden_size 10**12": ({"hidden_size": 10 ** 12}, "hidden_size"),
    "rms_norm_eps a string": ({"rms_norm_eps": "abc"}, "abc"),
    "rms_norm_eps NaN": ({"rms_norm_eps": float("nan")}, "norm_eps"),
    "rope_scaling a list": ({"rope_scaling": [1]}, "config.json"),
    "max_position_embeddings a string": ({"max_position_embeddings": "x"}, "config.json"),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    "model_type a list": ({"model_type": ["llama"]}, "model_type"),
    "eos_token_id a string": ({"eos_token_id": "x"}, "eos_token_ids"),
}


@pytest.mark.parametrize("how", list(HF_EDITS))
def test_hf_config_values_are_named_before_building(hf_dir: Path, tmp_path: Path, how: str) -> None:
    d = copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    over, word = HF_EDITS[how]
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))
    refused(d, lambda: layerfold.load(d, tokenizer=False), "config.json", word)


def test_hf_dir_with_only_pickles_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    d = copy(hf_dir, tmp_path)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    refused(d, lambda: layerfold.load(d, tokenizer=False), ".bin", "safetensors")


# ---- tokenizer files -------------------------------------------------------------------------------
TOKENIZER_DAMAGE = {
    "tokenizer.json corrupt": ("tokenizer.json", b"{not json"),
    "tokenizer.json empty": ("tokenizer.json", b""),
    "tokenizer.json binary": ("tokenizer.json", b"\xff\xfe\x00\x01" * 64),
    "tokenizer.json a list": ("tokenizer.json", b"[]"),
    "tokenizer.json deeply nested": ("tokenizer.json", b"[" * 100_000 + b"]" * 100_000),
    "tokenizer_config.json a list": ("tokenizer_config.json", b"[1]"),
}


@pytest.mark.parametrize("how", list(TOKENIZER_DAMAGE))
def test_corrupt_tokenizer_is_named(tmp_path: Path, tok: Any, how: str) -> None:
    d = tmp_path / "tok"
    tok.save_pretrained(str(d))
    name, data = TOKENIZER_DAMAGE[how]
    (d / name).write_bytes(data)
    refused(d, lambda: load_tokenizer(d), str(d), "tokenizer")


@pytest.fixture(scope="module")
def tok() -> Any:
    from layerfold.core.loading import resolve

    return load_tokenizer(resolve("smollm2-135m", quiet=True))
