"""User text files read with care: UTF-8 or a clear error naming the file, and tokens the model can read.

A binary file given as ``--data`` (random bytes, a zip, text in another encoding) would otherwise be
decoded with replacement characters and calibrate or evaluate on garbage without a word; these checks
refuse it with the file's name and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_BYTE_FALLBACK", "MAX_GARBAGE", "MAX_UNK", "check_tokens", "read_text_file"]


# Share of a file's characters that may be undecodable bytes (U+FFFD) or control characters before it is
# taken for a binary file: real text has next to none; random bytes decode to ~45% U+FFFD.
MAX_GARBAGE = 0.02


def read_text_file(path: Path) -> str:
    """A file's text as UTF-8; a ValueError naming the file when it is mostly not text (a binary file, another
    encoding). A few undecodable bytes in a large text are replaced (U+FFFD) rather than refused."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if not text:
        return text
    bad = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\n\r\t\f")
    if bad > MAX_GARBAGE * len(text):
        raise ValueError(f"{path}: not UTF-8 text ({bad / len(text):.0%} of its characters are undecodable bytes or "
                         "control characters: a binary file, or text in another encoding). Fix: give a UTF-8 text "
                         "file (convert it with e.g. iconv -t utf-8)")
    return text


# Above these shares of unknown or byte-fallback tokens the text is not language the tokenizer knows
# (random bytes, another script than the model's): calibrating or evaluating on it measures nothing.
MAX_UNK, MAX_BYTE_FALLBACK = 0.2, 0.5
_BYTE_IDS: dict[tuple, Tensor] = {}


def check_tokens(tokenizer: Any, ids: Tensor, source: str | Path) -> None:
    """Raise a ValueError naming ``source`` when its tokens are mostly unknown or byte-fallback tokens."""
    if ids.numel() == 0:
        return
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and float((ids == unk).float().mean()) > MAX_UNK:
        raise ValueError(f"{source}: {float((ids == unk).float().mean()):.0%} of its tokens are the unknown token "
                         f"{getattr(tokenizer, 'unk_token', '')!r}: not text this model's tokenizer can read. Fix: "
                         "give text in the model's language(s)")
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _BYTE_IDS:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _BYTE_IDS[key] = torch.tensor(sorted(i for t, i in vocab.items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)),
                                      dtype=torch.long)
    byte_ids = _BYTE_IDS[key]
    if byte_ids.numel():
        share = float(torch.isin(ids, byte_ids).float().mean())
        if share > MAX_BYTE_FALLBACK:
            raise ValueError(f"{source}: {share:.0%} of its tokens are byte-fallback tokens (<0x..>): not text this "
                             "model's tokenizer knows (binary data?). Fix: give text in the model's language(s)")
