"""The GGUF conversion cache: keyed on content (a reinstall that rewrites the same bytes converts nothing), and
each use removes the conversions it supersedes, nothing else."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import layerfold.core.loading as loading
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.loading import load_tokenizer, resolve
from layerfold.interop.export import export
from tests.support.models import SMOLLM2_VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _gguf(tmp_path, name: str, seed: int, tok):
    m = tiny_model(d_model=16, n_layers=2, heads=2, kv_heads=1, head_dim=8, ffn=24, vocab=SMOLLM2_VOCAB, seed=seed)
    ck = save_checkpoint(tmp_path / f"ck-{name}", m.spec, m.state_dict(), tokenizer=tok)
    export(ck, tmp_path / name, format="gguf")
    return tmp_path / name / "model.gguf"


def test_cache_keys_on_content_and_removes_superseded(tmp_path, monkeypatch):
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    g = _gguf(tmp_path, "a", 0, tok)
    first = resolve(g, quiet=True)
    assert first.parent == tmp_path / "cache" and first.name.startswith("model-")
    st = g.stat()
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))  # reinstalled: same bytes, new mtime

    def no_conversion(path, **kw):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "read_gguf", no_conversion)
    assert resolve(g, quiet=True) == first
    monkeypatch.undo()
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    # beside it: conversions of a file that exists (kept), of one that is gone (an uninstalled package's copy:
    # removed), of a copy of the same content (removed), one being written (kept), and a user's folder (kept)
    def conversion_of(name: str, source):
        d = tmp_path / "cache" / name
        shutil.copytree(first, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["provenance"]["source"] = str(source)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    (tmp_path / "exists.gguf").write_bytes(b"x")
    shutil.copy(g, tmp_path / "copy.gguf")
    kept = conversion_of("exists-00000000000000aa", tmp_path / "exists.gguf")
    gone = conversion_of("model-98362432-1795656328", tmp_path / "gone" / "model.gguf")  # the older key format
    twin = conversion_of("copy-98362432-1795660411", tmp_path / "copy.gguf")  # the same content as g
    half = conversion_of(".model-0123456789abcdef.tmp-1", tmp_path / "gone" / "model.gguf")  # being written
    mine = tmp_path / "cache" / "model-0123456789abcdef"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.setattr(loading, "read_gguf", no_conversion)
    assert resolve(g, quiet=True) == first  # a cache hit clears what it supersedes too
    monkeypatch.undo()
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    assert not gone.exists() and not twin.exists() and kept.is_dir() and half.is_dir()
    # the file at the first path replaced by other weights: a new key, the old conversion of that path removed
    shutil.copy(_gguf(tmp_path, "c", 2, tok), g)
    new = resolve(g, quiet=True)
    assert new != first and not first.exists() and kept.is_dir() and (mine / "notes.txt").read_text() == "mine"
    assert json.loads((new / "config.json").read_text())["provenance"]["source"] == str(g.resolve())
    assert not list((tmp_path / "cache").glob(".*.lock"))  # the conversion lock goes with the conversion


def test_the_embedded_tokenizer_adds_what_its_gguf_says() -> None:
    """SmolLM2's GGUF says add_bos_token false; transformers 4.x converted it to a tokenizer adding <|im_start|>
    to every encoding (transformers 5 did not), so scores depended on the transformers version."""
    from layerfold.core.tokenizer import gguf_special_flags

    flags = gguf_special_flags(loading.resolve_alias("smollm2-135m"))
    assert flags.get("add_bos_token") is False and flags["model"] == "gpt2"
    path = resolve("smollm2-135m", quiet=True)
    tok = load_tokenizer(path)
    assert tok("Hello")["input_ids"] == [19556] and tok("")["input_ids"] == []
    # 4.x also took <|im_start|> for EOS, cleaned up spaces after decoding and saved a LlamaTokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (flags["bos_token_id"], flags["eos_token_id"],
                                                                      flags["padding_token_id"]) == (1, 2, 2)
    ids = tok("it ' s fine . ok ?")["input_ids"]
    assert tok.decode(ids) == "it ' s fine . ok ?"
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and not cfg.get("clean_up_tokenization_spaces")


@pytest.mark.parametrize("flags,first,last", [({"add_bos_token": False}, 7, 7), ({"add_bos_token": True}, 1, 7),
                                              ({"add_bos_token": True, "add_eos_token": True}, 1, 2), ({}, 1, 7)])
def test_special_token_flags_are_honoured(flags: dict, first: int, last: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from layerfold.core.tokenizer import honour_special_flags

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 7}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                      special_tokens=[("<s>", 1)])  # adds BOS, as 4.x built it
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = honour_special_flags(tok, flags)("a a")["input_ids"]
    assert ids[0] == first and ids[-1] == last and ids.count(7) == 2
