"""Data: deterministic disjoint splits, file readers and their errors, token streams, calib windows, MC task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerfold.core import data as D
from tests.support.models import embedded_tokenizer


@pytest.fixture(scope="session")
def tok():
    return embedded_tokenizer()


def test_pydoc_split_is_disjoint_complete_and_nontrivial():
    from pydoc_data.topics import topics

    calib, val = D.documents("pydoc", "calib"), D.documents("pydoc", "val")
    assert not set(calib) & set(val)
    assert sorted(calib + val) == sorted(topics.values())
    assert D.documents("pydoc", "all") == [topics[k] for k in sorted(topics)]
    sizes = D.split_sizes("pydoc")
    assert sizes["val"]["chars"] > 50_000 and sizes["calib"]["chars"] > 4 * sizes["val"]["chars"] * 0.8
    for k in topics:  # stable hash: the split of a key never depends on the process
        assert D.split_of(k) in ("calib", "val")
    assert D.split_of("if") == D.split_of("if")
    assert D.load_text("pydoc", "val") == "\n\n".join(val)


def test_unknown_split_and_source_name_the_fix(tmp_path: Path):
    with pytest.raises(ValueError, match="Fix: use one of calib, val, all"):
        D.documents("pydoc", "test")
    with pytest.raises(FileNotFoundError, match="Fix"):
        D.load_text(tmp_path / "missing.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.csv.*Fix"):
        D.load_text(tmp_path / "a.csv")


def test_txt_documents_are_paragraph_runs_split_by_hash(tmp_path: Path):
    paras = [f"Paragraph {i} " + "word " * 120 for i in range(60)]
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(paras) + "\n")
    docs = D.documents(p, "all")
    assert all(len(d) >= D.TXT_DOC_CHARS for d in docs[:-1])
    calib, val = D.documents(p, "calib"), D.documents(p, "val")
    assert calib and val and not set(calib) & set(val)
    assert sorted(calib + val) == sorted(docs)
    assert "\n\n".join(docs).replace("\n\n", " ").split() == "\n\n".join(paras).split()


def test_jsonl_errors_name_line_and_fix(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON.*Fix: write one JSON object per line"):
        D.load_text(bad, "all")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: no \"text\" string field.*body.*Fix"):
        D.load_text(nofield, "all")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="multiple-choice file"):
        D.load_text(mc, "all")
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
    assert len(D.documents(ok, "calib")) + len(D.documents(ok, "val")) == 40


def test_tiny_file_without_val_names_the_fix(tmp_path: Path):
    p = tmp_path / "one.jsonl"
    for i in range(100):  # find a one-document file whose document hashes into calib
        p.write_text(json.dumps({"text": f"doc {i}"}) + "\n")
        if D.split_of(f"doc {i}") == "calib":
            break
    with pytest.raises(ValueError, match="'val' split.*Fix: give a larger file"):
        D.documents(p, "val")


def test_token_stream_joins_documents_with_eos(tok):
    s = D.token_stream(tok, "pydoc", "val")
    assert s.dtype == torch.long and s.ndim == 1 and s.numel() > 10_000
    docs = D.documents("pydoc", "val")
    assert int((s == tok.eos_token_id).sum()) == len(docs) - 1
    first = tok(docs[0], add_special_tokens=False)["input_ids"]
    assert s[:len(first)].tolist() == first and int(s[len(first)]) == tok.eos_token_id
    s[0] = -1  # callers get a copy: the cache is not corrupted
    assert int(D.token_stream(tok, "pydoc", "val")[0]) == first[0]


def test_calib_batches_shape_determinism_and_errors(tok):
    a = D.calib_batches(tok, n_samples=5, seq_len=64, seed=3)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, D.calib_batches(tok, n_samples=5, seq_len=64, seed=3))
    assert not torch.equal(a, D.calib_batches(tok, n_samples=5, seq_len=64, seed=4))
    stream = D.token_stream(tok, "pydoc", "calib").tolist()
    row = a[0].tolist()
    assert any(stream[i:i + 64] == row for i in range(len(stream) - 63))
    with pytest.raises(ValueError, match="not one sample of 10000000 tokens fits.*Fix"):
        D.calib_batches(tok, n_samples=1, seq_len=10**7)


def test_mc_task_deterministic_and_label_is_true_continuation(tok):
    items = D.mc_task(tok, n=40, seed=0)
    again = D.mc_task(tok, n=40, seed=0)
    assert len(items) == 40 and items == again
    assert D.mc_task(tok, n=40, seed=1) != items
    docs = D.documents("pydoc", "val")
    assert {it.label for it in items} == {0, 1, 2, 3}
    for it in items:
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        src = docs[it.meta["doc"]]
        assert src.startswith(it.context + it.choices[it.label], it.meta["char"])
        assert not it.context[-1].isspace() and it.choices[it.label][0].isspace()
        for j, c in enumerate(it.choices):
            assert c[0].isspace() and not c[-1].isspace()
            n_tok = len(tok(c, add_special_tokens=False)["input_ids"])
            assert 8 <= n_tok <= 24, (c, n_tok)  # ~cont_tokens=16, cut on word ends
            if j != it.label:  # distractors come from other documents
                assert not any(c in d for i, d in enumerate(docs) if i == it.meta["doc"])


def test_mc_file_roundtrip_and_errors(tmp_path: Path, tok):
    p = tmp_path / "mc.jsonl"
    recs = [{"context": "Q: 2+2? A:", "choices": ["4", "5"], "label": 0},
            {"context": "x", "choices": ["a", "b", "c"], "label": 2, "delimiter": ""}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    items = D.mc_task(tok, p, n=10)
    assert [(i.context, i.choices, i.label, i.delimiter) for i in items] == [
        ("Q: 2+2? A:", ["4", "5"], 0, " "), ("x", ["a", "b", "c"], 2, "")]
    p.write_text(json.dumps({"context": "x", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"mc\.jsonl:1: not a multiple-choice record.*Fix"):
        D.load_mc_file(p)
