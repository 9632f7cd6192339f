"""A GGUF file as input: its header read and checked as llama.cpp reads it, then converted through transformers.

transformers' GGUF reader builds the model from a few metadata keys, gives a weight the file lacks fresh random
values (a missing tensor, a layer more in ``block_count`` than in the tensors) and drops a tensor it has no place
for (a Llama file's q/k/v biases, layers past ``block_count``): such a file converted into another model than the
one llama.cpp runs, with no error (and it dequantised every tensor into memory at once: core.gguf_weights now
streams them). It reads neither ``attention.key_length`` for Qwen3 (head size 128 assumed)
nor a file's own vocabulary size. So :func:`read_header` parses the header here (fast: no tensor is read, no
token list built) and :func:`check_header` checks the architecture, the tokenizer and every tensor's name and
shape against the metadata, refusing with the tensor or key and the fix before anything is dequantised; the
conversion then gets the file's own sizes (:func:`read_gguf`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from layerfold.core.arch import spec_from_hf_config
from layerfold.core.checkpoint import open_weights
from layerfold.core.gguf_arch import ARCHS, LONGROPE, check_arch, expected_tensors, file_config, optional_tensors
from layerfold.core.gguf_rope import gguf_longrope, gguf_rope
from layerfold.core.gguf_weights import write_gguf_weights
from layerfold.core.paths import cache_dir, write_json_atomic
from layerfold.core.spec import ModelSpec
from layerfold.core.tokenizer import gguf_special_flags, gguf_tokenizer, quiet_transformers

# what a damaged GGUF raises inside the gguf and transformers readers (struct unpacking, numpy views, indexing)
GGUF_ERRORS = (ValueError, KeyError, OSError, EOFError, IndexError, TypeError, struct.error, RuntimeError)
TOKENIZERS = ("gpt2", "llama")  # byte-level BPE, SentencePiece: what transformers builds for these
REDOWNLOAD = "Fix: download or copy the file again (compare its size and SHA-256 with the source's)"
# GGUF value types: struct format of the scalars (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class Header:
    """The metadata (arrays of strings as their length only) and tensor table of a GGUF file."""
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # name -> (torch shape, type)
    arch: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Len(int):
    """An array in the metadata kept as its length (numbers past 65,536)."""


class _Texts(_Len):
    """An array of strings in the metadata, kept as its length."""


def read_header(path: Path) -> Header:
    """The header of the GGUF file ``path``; a ValueError with the fix when it is no readable, whole GGUF file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise _unreadable(path, e) from None
    if magic != b"GGUF":
        if isinstance(buf, mmap.mmap):
            buf.close()
        what = "it is empty" if not size else f"it does not start with the GGUF magic bytes but {magic!r}"
        raise ValueError(f"{path}: could not read the GGUF file: it is not one ({what}; {size:,} bytes). Fix: check "
                         "the path; a download that was cut off or saved an error page is no model: download it again")
    try:
        return _parse(buf, size)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        why = str(e) if isinstance(e, _Damaged) else "its header is cut off or holds values GGUF does not define"
        raise ValueError(f"{path}: could not read the GGUF file: it is truncated or damaged ({why}; it has {size:,} "
                         f"bytes). {REDOWNLOAD}") from None
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


class _Damaged(ValueError):
    pass


def _unreadable(path: Path, e: OSError) -> ValueError:
    return ValueError(f"{path}: could not read the GGUF file ({e.strerror or e}). Fix: make it readable by this user "
                      "(e.g. chmod a+r), or copy it somewhere readable")


def _parse(buf: Any, size: int) -> Header:
    version = struct.unpack_from("<I", buf, 4)[0]
    e = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads as 0x03000000
    version = struct.unpack_from(e + "I", buf, 4)[0]
    if version not in (2, 3):
        raise _Damaged(f"GGUF version {version} (llama.cpp writes 2 and 3)")
    n_tensors, n_kv = struct.unpack_from(e + "QQ", buf, 8)
    if n_kv * 12 > size or n_tensors * 28 > size:
        raise _Damaged(f"its header lists {n_kv:,} keys and {n_tensors:,} tensors, more than the file can hold")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from(e + "Q", buf, pos)
        if pos + 8 + n > size:
            raise _Damaged(f"a string at byte {pos:,} runs past the end of the file")
        s = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8")
        pos += 8 + n
        return s

    def value(t: int) -> Any:
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            (sub, n) = struct.unpack_from(e + "IQ", buf, pos)
            pos += 12
            if sub == 8:
                if n * 8 > size - pos:
                    raise _Damaged(f"an array of {n:,} strings at byte {pos:,} runs past the end of the file")
                for _ in range(n):
                    (k,) = struct.unpack_from(e + "Q", buf, pos)
                    pos += 8 + k
                if pos > size:
                    raise _Damaged("an array of strings runs past the end of the file")
                return _Texts(n)
            if sub not in _SCALAR:
                raise _Damaged(f"an array of value type {sub}, which GGUF does not define")
            width = struct.calcsize(_SCALAR[sub])
            if n * width > size - pos:
                raise _Damaged(f"an array of {n:,} values at byte {pos:,} runs past the end of the file")
            out = list(struct.unpack_from(f"{e}{n}{_SCALAR[sub]}", buf, pos)) if n <= 65536 else _Len(n)
            pos += n * width
            return out
        if t not in _SCALAR:
            raise _Damaged(f"a value of type {t} at byte {pos:,}, which GGUF does not define")
        (v,) = struct.unpack_from(e + _SCALAR[t], buf, pos)
        pos += struct.calcsize(_SCALAR[t])
        return v

    h = Header()
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from(e + "I", buf, pos)
        pos += 4
        h.fields[key] = value(t)
    import gguf  # the quantisation block sizes

    table = []
    for _ in range(n_tensors):
        name = string()
        (nd,) = struct.unpack_from(e + "I", buf, pos)
        if nd > 4:
            raise _Damaged(f"tensor {name} has {nd} dimensions (GGUF has at most 4)")
        dims = struct.unpack_from(f"{e}{nd}Q", buf, pos + 4)
        t, off = struct.unpack_from(e + "IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        if name in h.tensors:
            raise _Damaged(f"the tensor {name} is listed twice")
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor {name} has type id {t}, which the installed gguf package does not know: a newer "
                           "quantisation (then pip install -U gguf), or damage") from None
        count = 1
        for d in dims:
            count *= int(d)
        if not dims or dims[0] % block:
            raise _Damaged(f"tensor {name}: {list(dims)} elements do not fill whole {block}-element blocks")
        h.tensors[name] = (tuple(int(d) for d in reversed(dims)), t)
        table.append((name, off, count // block * nbytes))
    align = h.fields.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
        raise _Damaged(f"general.alignment is {align!r}, not a power of two")
    start = -(-pos // align) * align
    for name, off, nbytes in table:
        if start + off + nbytes > size:
            raise _Damaged(f"tensor {name} ends at byte {start + off + nbytes:,}, past the end of the file")
    h.arch = h.fields.get("general.architecture", "")
    if not isinstance(h.arch, str) or not h.arch:
        raise _Damaged("it names no general.architecture")
    return h


# ---- the checks: what llama.cpp would run, or a refusal --------------------------------------------------------
def check_header(path: Path, h: Header) -> dict[str, Any]:
    """The file's sizes (layers, widths, heads, head size, vocabulary), once its architecture, tokenizer and
    tensors are ones layerfold converts exactly; else a ValueError naming what is wrong and the fix."""
    check_arch(path, h)
    _check_tokenizer(path, h)
    return _check_tensors(path, h, _sizes(path, h))


def _check_tokenizer(path: Path, h: Header) -> None:
    model = h.get("tokenizer.ggml.model")
    if model in (None, "none"):
        said = "tokenizer.ggml.model is \"none\"" if model else "no tokenizer.ggml.model key"
        raise ValueError(
            f"{path}: the GGUF file has no tokenizer ({said}: a vocabulary-free file, such as `layerfold export "
            "--format gguf` writes for a model saved without one; llama.cpp runs it on token ids only), and "
            "layerfold converts a GGUF file with its tokenizer. Fix: load the layerfold checkpoint or HF directory "
            "the file was made from, or use a GGUF file that carries the model's tokenizer")
    if model not in TOKENIZERS:
        raise ValueError(f"{path}: its tokenizer is of kind {model!r} (tokenizer.ggml.model); layerfold converts "
                         "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers. Fix: load the model's HF "
                         "directory instead")
    if not isinstance(h.get("tokenizer.ggml.tokens"), _Texts):
        raise ValueError(f"{path}: tokenizer.ggml.tokens, the tokenizer's vocabulary, is missing or not a list of "
                         f"strings. {REDOWNLOAD}")


def _sizes(path: Path, h: Header) -> dict[str, int]:
    arch, n = h.arch, None

    def num(key: str, default: int | None = None) -> int:
        v = h.get(f"{arch}.{key}")
        if v is None and default is not None:
            return default
        if isinstance(v, list) and v and n is not None:
            if len(v) != n or len(set(v)) != 1:
                raise ValueError(f"{path}: {arch}.{key} differs per layer ({v[:6]}{'...' if len(v) > 6 else ''}): "
                                 "layers of different shapes, which layerfold imports from its own checkpoints and "
                                 "DeciLM HF directories only. Fix: load the checkpoint or HF directory the file was "
                                 "made from")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}: {arch}.{key} is {'missing' if v is None else repr(v)}, not a positive whole "
                             f"number. {REDOWNLOAD}")
        return v

    n = num("block_count")
    d, heads = num("embedding_length"), num("attention.head_count")
    hd = num("attention.key_length", d // heads if d % heads == 0 else None)
    s = {"layers": n, "d": d, "heads": heads, "kv": num("attention.head_count_kv", heads), "hd": hd,
         "ffn": num("feed_forward_length")}
    for key in ("attention.value_length", "rope.dimension_count"):  # (phi3's partial rotary: core.gguf_arch)
        if num(key, hd) != hd and not (arch == "phi3" and key == "rope.dimension_count"):
            raise ValueError(f"{path}: {arch}.{key} is {num(key)}, not the head size {hd} (attention.key_length): "
                             "a partial or asymmetric attention layerfold has no layer for. Fix: use a model of a "
                             "supported family as llama.cpp's converter writes it")
    if s["heads"] % s["kv"]:
        raise ValueError(f"{path}: {s['heads']} attention heads do not divide into {s['kv']} KV heads. {REDOWNLOAD}")
    embd = h.tensors.get("token_embd.weight")
    s["vocab"] = embd[0][0] if embd and len(embd[0]) == 2 else 0
    n_tok = int(h.get("tokenizer.ggml.tokens"))
    if embd and n_tok != s["vocab"]:
        raise ValueError(f"{path}: the tokenizer lists {n_tok:,} tokens but token_embd.weight has {s['vocab']:,} rows "
                         f"(llama.cpp refuses such a file too). {REDOWNLOAD}")
    return s


def _check_tensors(path: Path, h: Header, s: dict[str, int]) -> dict[str, int]:
    arch = h.arch
    want = expected_tensors(arch, s)
    rot = h.get(f"{arch}.rope.dimension_count") if arch == "phi3" else None  # (phi3: checked by check_arch)
    rot = rot if isinstance(rot, int) and not isinstance(rot, bool) and 0 < rot <= s["hd"] else s["hd"]
    optional = {"output.weight": (s["vocab"], s["d"]), **optional_tensors(arch, rot)}
    missing = [k for k in want if k not in h.tensors]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) of the {arch} model its metadata describes ({s['layers']} "
                         f"layers, {s['d']} wide) are not in the file (first: {', '.join(missing[:3])}); converted, "
                         f"they would be random weights. {REDOWNLOAD}")
    extra = [k for k in h.tensors if k not in want and k not in optional]
    if extra:
        layers = [int(k.split(".")[1]) for k in extra if k.startswith("blk.") and k.split(".")[1].isdigit()]
        why = (f"tensors of layer {max(layers)} while {arch}.block_count says {s['layers']} layers" if layers and
               max(layers) >= s["layers"] else f"tensors a {arch} model has no place for ({', '.join(extra[:4])})")
        raise ValueError(f"{path}: the file holds {why}: converted, they would be dropped, and the model would "
                         "compute other logits than llama.cpp. Fix: if the file is damaged or edited, download it "
                         "again; else convert the model from its HF directory, or open an issue naming the model")
    for name, shape in {**want, **optional}.items():
        got = h.tensors.get(name, (shape, 0))[0]
        if shape is not None and got != shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(got)}, but the metadata ({s['layers']} layers, "
                             f"{s['d']} wide, {s['heads']} heads of {s['hd']}, {s['kv']} KV heads, FFN {s['ffn']}, "
                             f"vocabulary {s['vocab']}) makes it {list(shape)}: the metadata does not describe the "
                             f"tensors. {REDOWNLOAD}")
    return s


# ---- the cache key ------------------------------------------------------------------------------------------
def stat_ident(path: Path) -> str:
    """Path, size, mtime, inode and ctime: a file rewritten in place keeps its path and may keep its size and mtime
    (``cp -p``, ``touch -r``), but not its ctime; one replaced by a rename gets another inode."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def content_key(path: Path, strict: bool = True) -> str | None:
    """The first 16 hex digits of the file's SHA-256, remembered in the cache's ``keys.json`` by path, size,
    mtime, inode and ctime (a reinstall that rewrites the same bytes costs one hash, not a conversion). A file
    that cannot be read: a ValueError with the fix, or (not ``strict``: another conversion's source) None."""
    try:
        ident = stat_ident(path)
    except OSError as e:
        if not strict:
            return None
        raise _unreadable(path, e) from None
    index = cache_dir() / "keys.json"
    try:
        known = json.loads(index.read_text()) if index.is_file() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        known = {}
    if isinstance(known.get(ident), str):
        return known[ident]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        if not strict:
            return None
        raise _unreadable(path, e) from None
    key = h.hexdigest()[:16]
    mine = f"{path.resolve()}|"  # drop this file's old entries and those of files that are gone
    known = {k: v for k, v in known.items() if not k.startswith(mine) and Path(k.split("|")[0]).is_file()}
    known[ident] = key
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json_atomic(index, known)
    except OSError:  # a read-only cache still works, it hashes every time
        pass
    return key


# ---- the conversion -----------------------------------------------------------------------------------------
def read_gguf(path: Path, weights_file: Path | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor], Any]:
    """The spec, float32 weights and tokenizer of a GGUF file, once :func:`check_header` passes: the config and
    tokenizer through transformers' GGUF reader (with the file's own sizes), the weights dequantised a tensor at a
    time into the safetensors file ``weights_file`` (core.gguf_weights; a temporary file when None) and returned
    memory-mapped from it, so a quantised 8B file converts in the memory of its largest tensor."""
    h = read_header(path)
    s = check_header(path, h)
    quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    d, f = str(path.parent), path.name
    try:
        cfg = file_config(AutoConfig.from_pretrained(d, gguf_file=f), h, s)
        tok = gguf_tokenizer(AutoTokenizer.from_pretrained(d, gguf_file=f), gguf_special_flags(path, h.fields))
    except (*GGUF_ERRORS, ImportError) as e:  # (4.x: a failed fast conversion falls back to needing protobuf)
        e = e.__context__ if isinstance(e, ImportError) and e.__context__ is not None else e  # the first failure
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"{path}: transformers' GGUF reader could not convert the file ({type(e).__name__}: {first})"
                         ", though its header and tensor table are whole. Fix: update transformers and gguf (pip "
                         "install -U transformers gguf), or convert the model from its HF directory") from None
    spec = replace(spec_from_hf_config(cfg, str(path)), tie_embeddings="output.weight" not in h.tensors)
    rope = h.get(f"{h.arch}.rope.scaling.type") is not None or "rope_freqs.weight" in h.tensors
    if spec.rope_type == "default" and rope:  # transformers drops llama.cpp's rope scaling keys and rope_freqs
        spec = gguf_rope(path, spec)
    if h.arch == "phi3" and LONGROPE[0] in h.tensors:  # (and its longrope factors: checked by check_arch)
        spec = gguf_longrope(path, spec)
    if spec.bos_token_id is None and tok.bos_token_id is not None:
        spec = ModelSpec.from_dict({**spec.to_dict(), "bos_token_id": tok.bos_token_id})
    l0 = spec.layers[0]
    got = (spec.n_layers, spec.d_model, l0.n_heads, l0.n_kv_heads, l0.head_dim, l0.d_ffn, spec.vocab_size)
    want = tuple(s[k] for k in ("layers", "d", "heads", "kv", "hd", "ffn", "vocab"))
    if got != want or spec.qkv_bias != (h.arch == "qwen2") or spec.qk_norm != (h.arch == "qwen3"):
        raise ValueError(f"{path}: transformers' GGUF reader built another model ({got}) than the file describes "
                         f"({want}). Fix: convert the model from its HF directory, and report the file")
    if weights_file is None:
        with tempfile.TemporaryDirectory() as tmp:  # (the mapping outlives the file's name)
            write_gguf_weights(path, spec, h.arch, Path(tmp) / "w.safetensors")
            return spec, open_weights(Path(tmp) / "w.safetensors"), tok
    write_gguf_weights(path, spec, h.arch, weights_file)
    return spec, open_weights(weights_file), tok


__all__ = ["ARCHS", "GGUF_ERRORS", "Header", "check_header", "content_key", "expected_tensors", "read_gguf",
           "read_header", "stat_ident"]
