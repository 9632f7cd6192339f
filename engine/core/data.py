"""Evaluation and calibration text: the built-in offline corpus, user files, token streams, an MC task.

Sources: ``"pydoc"`` (Python's own ``pydoc_data.topics``: 79 topics, ~465K characters of English
documentation, present in every CPython), a ``.txt`` file or a ``.jsonl`` file with a ``"text"`` field.

Every source is a list of documents; each document goes to ``calib`` or ``val`` by a stable hash of its
key (sha256, not Python's salted ``hash``): bucket = first 8 digest bytes mod 10, buckets 0-7 -> calib,
8-9 -> val. For pydoc the key is the topic name: 64 topics / 389K characters calib (~95K SmolLM2
tokens), 15 topics / 76K characters val (~18.4K tokens). For a ``.txt`` file a document is a run of
consecutive blank-line paragraphs of at least ``TXT_DOC_CHARS`` characters, keyed by its text; a
``.jsonl`` line is one document, keyed by its text. Identical documents always land in the same split.

The MC task is a 4-way "which text comes next" test built from ``val`` at the text level: the context
is a window of a document, the right choice its true continuation, the distractors continuations of
the same token length from random places of other documents. Cuts fall on whitespace so each choice
starts with the whitespace that separated it from the previous word (lm-eval's " answer" convention).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.textfiles import check_tokens, read_text_file

PYDOC = "pydoc"
SPLITS = ("calib", "val", "all")
VAL_BUCKETS = frozenset({8, 9})  # of 10: a 80/20 calib/val split
TXT_DOC_CHARS = 2000  # a .txt document: consecutive paragraphs until at least this many characters


class NotEnoughData(ValueError):
    """A source holds too little text for what was asked (a split without documents, fewer tokens than the
    samples need, too few documents for multiple-choice distractors). Commands without ``--split`` catch
    it to give their own fix."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the model scores ``context + delimiter + choice`` for every choice."""

    context: str
    choices: list[str]
    label: int  # index of the right choice
    delimiter: str = ""  # put between context and choice ("" for built-in items: choices carry their space)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def split_of(key: str) -> str:
    """'calib' or 'val' for a document key; stable across runs, machines and Python versions."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10
    return "val" if bucket in VAL_BUCKETS else "calib"


# ---- documents -----------------------------------------------------------------------------------
def _source_key(source: str | Path) -> tuple:
    """Identity of a source for caching: the name for pydoc, the path with its size and mtime for files."""
    s = str(source)
    if s == PYDOC:
        return (PYDOC,)
    p = Path(s)
    if not p.is_file():
        raise FileNotFoundError(f"{s}: no such file. Fix: use 'pydoc' (built-in text) or the path of a .txt or "
                                ".jsonl file")
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _pydoc_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics)]


def _txt_docs(path: Path) -> list[tuple[str, str]]:
    text = read_text_file(path)
    docs, cur, n = [], [], 0
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        cur.append(para.strip("\n"))
        n += len(para)
        if n >= TXT_DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return [(d, d) for d in docs]


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    out = []
    for i, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}). Fix: write one JSON "
                             "object per line, e.g. {\"text\": \"...\"}") from None
        except (RecursionError, ValueError) as e:  # nesting deeper than Python's stack; a number of 5000 digits
            raise ValueError(f"{path}:{i}: not a JSON line layerfold can read ({type(e).__name__}: {str(e)[:120]}). "
                             "Fix: write one flat JSON object per line, e.g. {\"text\": \"...\"}") from None
    return out


def is_mc_file(path: Path) -> bool:
    """A .jsonl whose first record has "choices": a multiple-choice file rather than text."""
    if path.suffix != ".jsonl":
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):  # reading the file names the line
                    return False
                return isinstance(rec, dict) and "choices" in rec
    return False


def _jsonl_docs(path: Path) -> list[tuple[str, str]]:
    mc = is_mc_file(path)
    docs = []
    for i, rec in _read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            got = (f"\"text\" holding {type(rec['text']).__name__}" if isinstance(rec, dict) and "text" in rec
                   else f"keys {sorted(rec)}" if isinstance(rec, dict) else type(rec).__name__)
            hint = " (this is a multiple-choice file: use it for the mc task only)" if mc else ""
            raise ValueError(f"{path}:{i}: no \"text\" string field (got {got}){hint}. Fix: give every line a "
                             "\"text\" field, e.g. {\"text\": \"...\"}")
        if rec["text"].strip():
            docs.append((rec["text"], rec["text"]))
    return docs


_DOCS: dict[tuple, list[tuple[str, str]]] = {}


def _all_docs(source: str | Path) -> list[tuple[str, str]]:
    key = _source_key(source)
    if key not in _DOCS:
        if key == (PYDOC,):
            docs = _pydoc_docs()
        else:
            p = Path(source)
            if p.suffix == ".txt":
                docs = _txt_docs(p)
            elif p.suffix == ".jsonl":
                docs = _jsonl_docs(p)
            else:
                raise ValueError(f"{p}: unknown text format {p.suffix!r}. Fix: use 'pydoc', a .txt file (plain "
                                 "text) or a .jsonl file (one {\"text\": ...} object per line)")
        if not docs:
            raise ValueError(f"{source}: no text found. Fix: give a file with some non-blank text")
        _DOCS[key] = docs
    return _DOCS[key]


def documents(source: str | Path = PYDOC, split: str = "val") -> list[str]:
    """The documents of ``source`` that fall in ``split`` ("calib" | "val" | "all"), in source order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}. Fix: use one of {', '.join(SPLITS)}")
    docs = _all_docs(source)
    out = [t for k, t in docs if split == "all" or split_of(k) == split]
    if not out:
        raise NotEnoughData(f"{source}: none of its {len(docs)} documents falls in the {split!r} split (documents "
                         f"are assigned ~80/20 calib/val by a hash). Fix: give a larger file (more documents) or "
                         f"use split 'all'")
    return out


def load_text(source: str | Path = PYDOC, split: str = "val") -> str:
    """The text of a split: its documents joined by blank lines."""
    return "\n\n".join(documents(source, split))


def split_sizes(source: str | Path = PYDOC) -> dict[str, dict[str, int]]:
    """{split: {"docs": n, "chars": n}} for calib and val."""
    out = {s: {"docs": 0, "chars": 0} for s in ("calib", "val")}
    for k, t in _all_docs(source):
        s = out[split_of(k)]
        s["docs"] += 1
        s["chars"] += len(t)
    return out


# ---- tokens --------------------------------------------------------------------------------------
def _tok_key(tokenizer: Any) -> tuple:
    return (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))


def _encode(tokenizer: Any, texts: list[str], offsets: bool = False) -> Any:
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)


_STREAMS: dict[tuple, Tensor] = {}


def token_stream(tokenizer: Any, source: str | Path = PYDOC, split: str = "val") -> Tensor:
    """LongTensor (N,): each document tokenized on its own (no BOS), EOS between documents.

    Cached in-process per (tokenizer, source, split); the returned tensor is a copy.
    """
    key = (_tok_key(tokenizer), _source_key(source), split)
    if key not in _STREAMS:
        docs = documents(source, split)
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for i, d in enumerate(_encode(tokenizer, docs)["input_ids"]):
            if i and eos is not None:
                ids.append(eos)
            ids.extend(d)
        stream = torch.tensor(ids, dtype=torch.long)
        check_tokens(tokenizer, stream, source)
        _STREAMS[key] = stream
    return _STREAMS[key].clone()


def calib_batches(tokenizer: Any, source: str | Path = PYDOC, split: str = "calib", n_samples: int = 64,
                  seq_len: int = 256, seed: int = 0, distinct: bool = False) -> Tensor:
    """LongTensor (n_samples, seq_len): windows of the token stream at seeded random offsets.

    distinct: raise unless the split holds at least n_samples x seq_len tokens (the CLI's check: fewer
    means the windows mostly repeat the same text)."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"n_samples={n_samples}, seq_len={seq_len}. Fix: use --samples >= 1 and --seq-len >= 2")
    stream = token_stream(tokenizer, source, split)
    n = stream.numel()
    if n < seq_len or distinct and n < n_samples * seq_len:
        fit = f"at most {n // seq_len} samples of {seq_len} tokens fit" if n >= seq_len else \
            f"not one sample of {seq_len} tokens fits"
        raise NotEnoughData(f"{source} ({split!r} split) has {n} tokens, fewer than {n_samples} samples x {seq_len} "
                         f"tokens = {n_samples * seq_len} ({fit}). Fix: lower --samples or --seq-len, or give more "
                         f"text (the {split!r} split is about {'80' if split == 'calib' else '20'}% of the documents)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# ---- multiple choice -----------------------------------------------------------------------------
class _Doc:
    """A document with its token start offsets (characters) and word boundaries, for cutting on whitespace."""

    def __init__(self, text: str, tok_starts: list[int]):
        self.text = text
        self.tok_starts = tok_starts
        words = [m.span() for m in re.finditer(r"\S+", text)]
        self.word_starts = [s for s, _ in words]
        self.word_ends = [e for _, e in words]

    def tok_char(self, t: int) -> int:
        """Character offset of token t (len(text) past the end)."""
        return self.tok_starts[t] if t < len(self.tok_starts) else len(self.text)

    def snap_end(self, c: int) -> int:
        """The word end nearest to c (a position where a word stops and whitespace or the text end follows)."""
        i = bisect.bisect_left(self.word_ends, c)
        cands = [self.word_ends[j] for j in (i - 1, i) if 0 <= j < len(self.word_ends)]
        return min(cands, key=lambda e: (abs(e - c), e))

    def snap_start(self, c: int) -> int:
        """The first word start at or after c (len(text) if none)."""
        i = bisect.bisect_left(self.word_starts, c)
        return self.word_starts[i] if i < len(self.word_starts) else len(self.text)

    def span(self, start_char: int, n_tokens: int) -> tuple[int, int]:
        """[start_char, word end nearest to the end of the n_tokens tokens that begin at start_char]."""
        t = bisect.bisect_left(self.tok_starts, start_char)
        return start_char, self.snap_end(self.tok_char(t + n_tokens))


def _token_starts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if getattr(tokenizer, "is_fast", False):
        return [[s for s, _ in offs] for offs in _encode(tokenizer, texts, offsets=True)["offset_mapping"]]
    # slow tokenizers give no offsets: spread the tokens evenly over the characters
    out = []
    for text, ids in zip(texts, _encode(tokenizer, texts)["input_ids"], strict=True):
        n = max(len(ids), 1)
        out.append([round(i * len(text) / n) for i in range(len(ids))])
    return out


def _distractor(doc: _Doc, cont_tokens: int, rng: random.Random) -> str | None:
    """A continuation-shaped piece of doc: from a word end (so it starts with whitespace), ~cont_tokens long."""
    last = len(doc.tok_starts) - cont_tokens  # start early enough for a full-length piece
    if last < 1:
        return None
    ends = doc.word_ends[:bisect.bisect_left(doc.word_ends, doc.tok_starts[last])]
    if not ends:
        return None
    s, e = doc.span(ends[rng.randrange(len(ends))], cont_tokens)
    piece = doc.text[s:e]
    return piece if piece.strip() else None


def mc_task(tokenizer: Any, source: str | Path = PYDOC, split: str = "val", n: int = 500, context_tokens: int = 24,
            cont_tokens: int = 16, seed: int = 0, n_choices: int = 4) -> list[MCItem]:
    """Up to ``n`` 4-way continuation items from ``split``, the same for the same inputs and tokenizer.

    Contexts come from non-overlapping windows of context_tokens + cont_tokens tokens, so there are at
    most about (tokens in split) / (context_tokens + cont_tokens) items (~450 for pydoc val at 24 + 16).
    The default lengths were measured to leave room both ways: dense SmolLM2-135M scores acc 0.73 /
    acc_norm 0.71 on 120 pydoc val items (0.86 / 0.81 with 48-token contexts: too easy to show losses).
    A ``.jsonl`` file of {"context", "choices", "label"} records is read as-is instead (first n items).
    """
    if context_tokens < 1 or cont_tokens < 1 or n < 1 or n_choices < 2:
        raise ValueError(f"n={n}, context_tokens={context_tokens}, cont_tokens={cont_tokens}, n_choices={n_choices}"
                         ". Fix: use positive sizes and at least 2 choices")
    if str(source) != PYDOC and Path(source).is_file() and is_mc_file(Path(source)):
        return load_mc_file(source)[:n]
    texts = documents(source, split)
    if len(texts) < n_choices:
        raise NotEnoughData(f"{source} ({split}) has {len(texts)} documents; distractors must come from other "
                         f"documents, so it needs at least {n_choices}. Fix: give a larger file or use split 'all'")
    docs = [_Doc(t, s) for t, s in zip(texts, _token_starts(tokenizer, texts), strict=True)]
    width = context_tokens + cont_tokens
    slots = [(d, k * width) for d, doc in enumerate(docs) for k in range(len(doc.tok_starts) // width)]
    rng = random.Random(seed)
    rng.shuffle(slots)
    items: list[MCItem] = []
    for d, t0 in slots:
        if len(items) >= n:
            break
        doc = docs[d]
        c0 = doc.snap_start(doc.tok_char(t0))
        c1 = doc.snap_end(doc.tok_char(t0 + context_tokens))
        if not c0 < c1:
            continue
        _, c2 = doc.span(c1, cont_tokens)
        context, answer = doc.text[c0:c1], doc.text[c1:c2]
        if not answer.strip():
            continue
        others = [j for j in range(len(docs)) if j != d]
        rng.shuffle(others)
        wrong: list[str] = []
        for j in others:
            piece = _distractor(docs[j], cont_tokens, rng)
            if piece is not None and piece != answer and piece not in wrong:
                wrong.append(piece)
            if len(wrong) == n_choices - 1:
                break
        if len(wrong) < n_choices - 1:
            continue
        label = rng.randrange(n_choices)
        choices = wrong[:label] + [answer] + wrong[label:]
        items.append(MCItem(context, choices, label, meta={"doc": d, "char": c0}))
    if not items:
        raise NotEnoughData(f"{source} ({split}): no document is {width} tokens long, so no MC item can be made. Fix: "
                         "lower context_tokens/cont_tokens or give longer documents")
    return items


def load_mc_file(path: str | Path) -> list[MCItem]:
    """Read {"context": str, "choices": [str, ...], "label": int[, "delimiter": str]} lines.

    As in lm-eval, the model scores context + delimiter + choice; the delimiter defaults to " ".
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file. Fix: give the path of a .jsonl multiple-choice file")
    items = []
    for i, rec in _read_jsonl(p):
        ok = (isinstance(rec, dict) and isinstance(rec.get("context"), str) and isinstance(rec.get("choices"), list)
              and len(rec["choices"]) >= 2 and all(isinstance(c, str) for c in rec["choices"])
              and isinstance(rec.get("label"), int) and 0 <= rec["label"] < len(rec["choices"])
              and isinstance(rec.get("delimiter", " "), str))
        if not ok:
            raise ValueError(f"{p}:{i}: not a multiple-choice record. Fix: write {{\"context\": str, \"choices\": "
                             "[str, str, ...], \"label\": index of the right choice} on every line")
        items.append(MCItem(rec["context"], list(rec["choices"]), rec["label"], rec.get("delimiter", " ")))
    if not items:
        raise ValueError(f"{p}: no records. Fix: write one JSON object per line")
    return items


__all__ = ["MCItem", "NotEnoughData", "PYDOC", "SPLITS", "calib_batches", "documents", "is_mc_file", "load_mc_file",
           "load_text", "mc_task", "split_of", "split_sizes", "token_stream"]
