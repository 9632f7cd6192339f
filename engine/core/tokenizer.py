"""The tokenizer of a model folder, through transformers, never running code from the folder."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from layerfold.core.checkpoint import CheckpointError

__all__ = ["load_tokenizer", "quiet_transformers"]


def quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


def load_tokenizer(path: str | Path) -> Any:
    p = Path(path)
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")) \
            and not any(p.glob("*.model")):
        raise CheckpointError(f"{p}: holds no tokenizer (no tokenizer.json, tokenizer_config.json, vocab.json or "
                              "*.model). Fix: copy the tokenizer files of the model it came from into it, or "
                              "re-save it with its tokenizer")
    quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never runs code from a folder
    except ImportError as e:  # transformers 4.x falls back to sentencepiece where tokenizer.json is absent or bad
        why = _unreadable(p / "tokenizer.json")
        if why is None:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "sentencepiece or protobuf"
            raise CheckpointError(f"{p}: reading its tokenizer needs a package that is not installed ({first}). Fix: "
                                  "pip install sentencepiece protobuf, or copy the tokenizer.json of the model it came "
                                  "from into it") from None
        raise CheckpointError(f"{p}: its tokenizer files could not be read ({why}). Fix: copy the tokenizer files "
                              "(tokenizer.json, tokenizer_config.json) of the model it came from into it") from None
    except (ValueError, TypeError, AttributeError, KeyError, OSError, RecursionError) as e:
        raise CheckpointError(f"{p}: its tokenizer files could not be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}). Fix: copy the tokenizer files "
                              "(tokenizer.json, tokenizer_config.json) of the model it came from into it") from None


def _unreadable(f: Path) -> str | None:
    """Why ``f`` (a tokenizer.json) is not a JSON object, or None when it is one or is absent."""
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_bytes())
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        return f"{f.name}: {type(e).__name__}: {str(e)[:200]}"
    return None if isinstance(obj, dict) else f"{f.name} holds a JSON {type(obj).__name__}, not an object"
