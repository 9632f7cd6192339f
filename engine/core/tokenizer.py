"""The tokenizer of a model folder, through transformers, never running code from the folder."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from layerfold.core.checkpoint import CheckpointError

__all__ = ["gguf_special_flags", "gguf_tokenizer", "honour_special_flags", "load_tokenizer", "quiet_transformers"]


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


def gguf_special_flags(path: str | Path, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GGUF file's own ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` / ``add_space_prefix`` (the keys it
    holds), its tokenizer ``model`` ("gpt2": byte-level BPE; "llama": SentencePiece; ...) and ``pre``-tokenizer,
    its special token ids (``bos_token_id``, ``eos_token_id``, ``unknown_token_id``, ``padding_token_id``), and
    its general ``name`` and ``architecture``.
    ``fields``: the file's metadata already read (``layerfold.core.gguf_input.read_header``), else read here."""
    if fields is None:
        from gguf import GGUFReader

        fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()
                  if k.startswith(("tokenizer.ggml.", "general.")) and f.data and len(f.data) == 1}
    out: dict[str, Any] = {k: str(fields[f"general.{k}"]) for k in ("name", "architecture")
                           if isinstance(fields.get(f"general.{k}"), str)}
    for name in ("add_bos_token", "add_eos_token", "add_space_prefix", "model", "pre", "bos_token_id", "eos_token_id",
                 "unknown_token_id", "padding_token_id"):
        value = fields.get(f"tokenizer.ggml.{name}")
        if value is None or isinstance(value, list):
            continue
        if name in ("model", "pre"):
            out[name] = str(value)
        elif name.startswith("add_"):
            out[name] = bool(value)
        elif isinstance(value, int):
            out[name] = int(value)
    return out


# byte-level BPE pre-tokenizers (tokenizer.ggml.pre) for which llama.cpp adds BOS when the file has no
# add_bos_token (checked with llama-cpp-python 0.3.36; SentencePiece files always default to BOS)
BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "tekken",
                  "chameleon")


def gguf_tokenizer(tok: Any, meta: dict[str, Any]) -> Any:
    """The tokenizer transformers built from a GGUF file, made to encode and decode as the file says whatever
    the transformers version (``meta``: :func:`gguf_special_flags`). transformers 4.x builds a Llama-style
    tokenizer: it adds BOS whatever the file says, cleans up spaces after decoding (" ." -> "."), and wraps
    a byte-level vocabulary in SentencePiece pieces (byte fallback, a "\u2581" replacement in its decoder);
    llama.cpp and transformers 5 do none of that. The conversion is cached, so this also keeps a cached model
    the same whichever transformers made it."""
    if "add_bos_token" not in meta:  # llama.cpp's default where the file does not say (its llm_tokenizer setup)
        meta = {**meta, "add_bos_token": meta.get("model") == "llama" or meta.get("pre") in BOS_BY_DEFAULT}
    tok.clean_up_tokenization_spaces = False  # llama.cpp's text is the pieces, concatenated
    bt = getattr(tok, "backend_tokenizer", None)
    if meta.get("model") == "gpt2" and bt is not None:  # byte-level BPE: the plain byte-level decoder
        from tokenizers import decoders

        vocab = bt.get_vocab()
        if not any(t.startswith("<0x") and t.endswith(">") for t in vocab):  # byte fallback has no tokens
            bt.decoder = decoders.ByteLevel()
            if getattr(bt.model, "byte_fallback", False):
                bt.model.byte_fallback = False
    if meta.get("model") == "llama" and bt is not None:  # SentencePiece: llama.cpp's space prefix
        bt = _file_vocabulary(bt)
        _sentencepiece_spaces(bt, meta.get("add_space_prefix", True))
    if meta.get("architecture") == "phi3" and bt is not None and \
            any(k in meta.get("name", "").lower() for k in ("phi-3", "phi3")):
        _phi3_rstrip(bt)
    if bt is None:
        return honour_special_flags(tok, meta)
    # saved as the plain class over its tokenizer.json (not 4.x's LlamaTokenizer, which rebuilds BOS handling
    # from its config): every transformers version then reads the cache's tokenizer the same way
    from transformers import PreTrainedTokenizerFast

    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tok, k, None) is not None}
    n = bt.get_vocab_size(with_added_tokens=True)
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):  # the file's ids (transformers 4.x took <|im_start|> as EOS)
        if isinstance(meta.get(name), int) and 0 <= meta[name] < n:
            special[key] = bt.id_to_token(meta[name])
    tok = PreTrainedTokenizerFast(tokenizer_object=bt, chat_template=getattr(tok, "chat_template", None),
                                  clean_up_tokenization_spaces=False, **special)
    return honour_special_flags(tok, meta)  # (after the file's ids: 4.x's BOS-as-EOS went into its template)


def _sentencepiece_spaces(bt: Any, prefix: bool) -> None:
    """Spaces as llama.cpp (and SentencePiece itself) encode them: a "\u2581" before every text (after each
    special token too, when the file says ``add_space_prefix``: the default), then every space a "\u2581".
    transformers builds a Metaspace pre-tokenizer that adds the prefix only where the text does not start with a
    space: " hello" was "\u2581hello", not "\u2581\u2581hello", one space lost at the start of every such text."""
    from tokenizers import decoders, normalizers

    space = [normalizers.Replace(" ", "\u2581")]
    bt.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *space] if prefix else space)
    bt.pre_tokenizer = None
    if not prefix:  # no prefix to take off again when decoding
        bt.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])


def _file_vocabulary(bt: Any) -> Any:
    """A SentencePiece file's tokenizer over the file's own tokens, with byte fallback. transformers 4.x converts a
    phi3 file with neither: it adds Phi-3's chat tokens (``<|placeholder1|>``, ...) whatever the file holds (a token
    the file lacks got an id past the model's embedding) and drops a character no piece covers ("T" in "The"),
    where llama.cpp (and transformers 5) spell it in byte tokens ``<0x54>``."""
    from tokenizers import Tokenizer

    n = bt.get_vocab_size(with_added_tokens=False)  # (the BPE vocabulary: every token of the file)
    if bt.get_vocab_size(with_added_tokens=True) > n:
        j = json.loads(bt.to_str())
        j["added_tokens"] = [t for t in j.get("added_tokens", []) if t["id"] < n]
        bt = Tokenizer.from_str(json.dumps(j))
    vocab = bt.get_vocab(with_added_tokens=False)
    if not getattr(bt.model, "byte_fallback", True) and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        bt.model.byte_fallback = True
    return bt


def _phi3_rstrip(bt: Any) -> None:
    """llama.cpp strips the whitespace after each special token of a file whose name says Phi-3 (as Phi-3's own
    tokenizer.json does: "<|user|>\\nHi" is <|user|> Hi), except after <unk>, <s> and <|endoftext|>."""
    from tokenizers import AddedToken

    bt.add_special_tokens([AddedToken(t.content, rstrip=True, lstrip=t.lstrip, single_word=t.single_word,
                                      normalized=t.normalized, special=True)
                           for t in bt.get_added_tokens_decoder().values()
                           if t.special and t.content not in ("<unk>", "<s>", "<|endoftext|>")])


def honour_special_flags(tok: Any, flags: dict[str, bool]) -> Any:
    """Make ``tok`` add BOS / EOS to an encoding exactly as ``flags`` say. transformers 4.x builds a GGUF's
    Llama-style tokenizer that adds BOS whatever the file says (SmolLM2's says false): every prompt then
    began with an extra <|im_start|> under transformers 4.56 and not under 5, changing every score. And a special
    token whose text starts with "$" ("$" as BOS) reads as "$A" in transformers' template: it encoded every text
    twice, without the BOS."""
    want_bos, want_eos = flags.get("add_bos_token"), flags.get("add_eos_token")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = tok("a", add_special_tokens=False)["input_ids"]
    ids = tok("a")["input_ids"]
    has_bos, has_eos = bool(ids) and ids[0] == bos, bool(ids) and ids[-1] == eos and len(ids) > 1
    add_bos = has_bos if want_bos is None or bos is None else want_bos
    add_eos = has_eos if want_eos is None or eos is None else want_eos

    def right() -> bool:
        return tok("a")["input_ids"] == [bos] * add_bos + plain + [eos] * add_eos

    if right():
        return tok
    for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if name in getattr(tok, "init_kwargs", {}) or hasattr(type(tok), name):
            try:
                setattr(tok, name, value)  # LlamaTokenizerFast: rebuilds its post-processor, saved in its config
            except AttributeError:
                pass
    if not right():  # the template names the tokens by alias: a token's own text may read as a sequence ("$A")
        from tokenizers.processors import TemplateProcessing

        head = [{"id": "__bos__", "ids": [bos], "tokens": [tok.bos_token]}] if add_bos else []
        tail = [{"id": "__eos__", "ids": [eos], "tokens": [tok.eos_token]}] if add_eos else []
        one = " ".join([t["id"] for t in head] + ["$A:0"] + [t["id"] for t in tail])
        two = one + " " + " ".join([t["id"] + ":1" for t in head] + ["$B:1"] + [t["id"] + ":1" for t in tail])
        tok.backend_tokenizer.post_processor = TemplateProcessing(single=one, pair=two, special_tokens=head + tail)
    return tok
